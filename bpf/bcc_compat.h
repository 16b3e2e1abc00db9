/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The BCC side of the program: the twin of libbpf_compat.h (same names, BCC's syntax).
 * ipe_bpf/kernel/bcc_loader.py splices this file into ipe_bpf.bpf.c (BCC rewrites map
 * method calls only in the main source buffer) and compiles against the running kernel's
 * headers.  BCC has no CO-RE: private structs are reached at offsets passed as -D defines
 * (IPE_OFF_*, from the kernel's BTF: ipe_bpf/kernel/btf.py), and IPE_HAVE_* say which
 * groups were found.
 *
 * Sizes that the loader picks at load time also arrive as -D defines:
 *   IPE_DEVICES_MAX, IPE_RINGBUF_PAGES
 */
#ifndef IPE_BCC_COMPAT_H
#define IPE_BCC_COMPAT_H

#include <linux/fs.h>
#include <linux/mount.h>
#include <linux/dcache.h>
#include <linux/binfmts.h>
#include <linux/mm.h>
#include <linux/mman.h>
#include <linux/blkdev.h>
#include <linux/blk_types.h>
#include <linux/kernel_read_file.h>
#include <linux/security.h>
#include <linux/errno.h>
#include <linux/magic.h>
#include <linux/stddef.h>

#include "ipe_bpf.h"

#ifndef IPE_DEVICES_MAX
#define IPE_DEVICES_MAX 1024
#endif
#ifndef IPE_RINGBUF_PAGES
#define IPE_RINGBUF_PAGES 64
#endif

/* One BPF LSM program per hook; `name` is the LSM hook name (BCC names it lsm__<name>). */
#define IPE_HOOK(name, args...) LSM_PROBE(name, args)

/* the policy maps are read-only for BPF programs, as in libbpf_compat.h */
BPF_F_TABLE("array", __u32, struct ipe_config, ipe_config, 1, BPF_F_RDONLY_PROG);
BPF_F_TABLE("array", __u32, struct ipe_policy_defaults, ipe_defaults, IPE_SLOTS, BPF_F_RDONLY_PROG);
/* the per-slot tables' templates and the arrays of maps holding them (libbpf_compat.h) */
BPF_F_TABLE("hash", struct ipe_digest_key, struct ipe_digest_value, ipe_digests_table, 1, BPF_F_RDONLY_PROG);
BPF_ARRAY_OF_MAPS(ipe_digests, "ipe_digests_table", IPE_SLOTS);
BPF_F_TABLE("hash", struct ipe_rule_key, struct ipe_rule_value, ipe_rules_table, 1,
	    BPF_F_RDONLY_PROG);
BPF_ARRAY_OF_MAPS(ipe_rules, "ipe_rules_table", IPE_SLOTS);
/* pinned like the others; BCC builds have no seal hooks (ipe_bpf.bpf.c) and are never sealed */
BPF_F_TABLE("array", __u32, struct ipe_seal, ipe_seal, 1, BPF_F_RDONLY_PROG);
BPF_HASH(ipe_devices, __u32, struct ipe_bdev_state, IPE_DEVICES_MAX);
BPF_PERCPU_ARRAY(ipe_counters, struct ipe_counters, 1);
BPF_RINGBUF_OUTPUT(ipe_events, IPE_RINGBUF_PAGES);
BPF_INODE_STORAGE(ipe_inodes, struct ipe_inode_state);
BPF_PERCPU_ARRAY(ipe_scratch, struct ipe_path_scratch, 1);

/*
 * Map access by name: ipe_map_lookup(ipe_devices, &k) calls ipe_devices_lookup(&k) below,
 * where BCC can rewrite the map method call.
 */
#define ipe_map_lookup(map, key) map##_lookup(key)
#define ipe_map_update(map, key, value) map##_update(key, value)
#define ipe_map_delete(map, key) map##_delete(key)
#define ipe_ringbuf_reserve(map, size) map##_reserve(size)
#define ipe_ringbuf_submit(e) ipe_events_submit(e)
#define ipe_inode_storage(map, inode, flags) map##_get((void *)(inode), flags)

static __always_inline struct ipe_config *ipe_config_lookup(__u32 *key) { return ipe_config.lookup(key); }
static __always_inline struct ipe_policy_defaults *ipe_defaults_lookup(__u32 *key) { return ipe_defaults.lookup(key); }
static __always_inline void *ipe_digests_lookup(__u32 *slot) { return ipe_digests.lookup(slot); }
static __always_inline void *ipe_rules_lookup(__u32 *slot) { return ipe_rules.lookup(slot); }
static __always_inline struct ipe_counters *ipe_counters_lookup(__u32 *key) { return ipe_counters.lookup(key); }
static __always_inline struct ipe_path_scratch *ipe_scratch_lookup(__u32 *key) { return ipe_scratch.lookup(key); }
static __always_inline struct ipe_bdev_state *ipe_devices_lookup(__u32 *key) { return ipe_devices.lookup(key); }
static __always_inline void ipe_devices_update(__u32 *key, struct ipe_bdev_state *v) { ipe_devices.update(key, v); }
static __always_inline void ipe_devices_delete(__u32 *key) { ipe_devices.delete(key); }
static __always_inline struct ipe_event *ipe_events_reserve(int size) { return ipe_events.ringbuf_reserve(size); }
static __always_inline void ipe_events_submit(struct ipe_event *e) { ipe_events.ringbuf_submit(e, 0); }
static __always_inline struct ipe_inode_state *ipe_inodes_get(void *inode, int flags)
{
	return ipe_inodes.inode_storage_get(inode, 0, flags);
}

/* ------------------------------------------------------------------ kernel access */

#define IPE_FIELD(dst, ptr, type, member) \
	bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(ptr) + offsetof(type, member))
#define IPE_OFFSET(type, member) offsetof(type, member)
#define IPE_ENUM(type, name) (name)
#define IPE_CORE_BARRIER(x) asm volatile("" : "+r"(x))

/* The running kernel's headers are 6.12's: no compressed-module ids. */
#define IPE_HAVE_READING_MODULE_COMPRESSED 0
#define IPE_READING_MODULE_COMPRESSED 0
#define IPE_HAVE_LOADING_MODULE_COMPRESSED 0
#define IPE_LOADING_MODULE_COMPRESSED 0
/* No decision cache in BCC builds (its inode storage cannot hold a bpf_spin_lock): every event
 * is decided from scratch, with the same results. */
#define IPE_HAVE_CACHE 0

/* CONFIG_AUDIT (Debian's 6.12): the task has a login uid and session */
#define IPE_HAVE_LOGINUID 1
/* overlayfs before 6.5 is not a BCC target */
#define IPE_HAVE_OVL61 0
#define IPE_OFF_OVL_INODE_LOWERPATH 0

/* Groups of private offsets that btf.py did not find are 0 and never used. */
#ifndef IPE_HAVE_INODE_VERITY
#define IPE_HAVE_INODE_VERITY 0
#define IPE_OFF_INODE_VERITY 0
#define IPE_OFF_FSVERITY_INFO_HASH_ALG 0
#define IPE_OFF_FSVERITY_INFO_DIGEST 0
#define IPE_OFF_HASH_ALG_NAME 0
#define IPE_OFF_HASH_ALG_SIZE 0
#endif
#ifndef IPE_HAVE_OVL
#define IPE_HAVE_OVL 0
#define IPE_OFF_OVL_INODE_VFS_INODE 0
#define IPE_OFF_OVL_INODE_UPPER 0
#define IPE_OFF_OVL_INODE_OE 0
#define IPE_OFF_OVL_ENTRY_NUMLOWER 0
#define IPE_OFF_OVL_ENTRY_LOWERSTACK 0
#define IPE_OFF_OVL_PATH_DENTRY 0
#define IPE_SIZEOF_OVL_PATH 0
#endif
#ifndef IPE_HAVE_MOUNT
#define IPE_HAVE_MOUNT 0
#define IPE_OFF_MOUNT_MNT 0
#define IPE_OFF_MOUNT_PARENT 0
#define IPE_OFF_MOUNT_MOUNTPOINT 0
#endif
#ifndef IPE_HAVE_DM_TABLE
#define IPE_HAVE_DM_TABLE 0
#define IPE_OFF_MAPPED_DEVICE_MAP 0
#define IPE_OFF_DM_TABLE_NUM_TARGETS 0
#define IPE_OFF_DM_TABLE_TARGETS 0
#define IPE_OFF_DM_TARGET_TYPE 0
#define IPE_OFF_DM_TARGET_PRIVATE 0
#define IPE_OFF_TARGET_TYPE_NAME 0
#define IPE_OFF_DM_VERITY_ALG_NAME 0
#define IPE_OFF_DM_VERITY_ROOT_DIGEST 0
#define IPE_OFF_DM_VERITY_DIGEST_SIZE 0
#endif
#ifndef IPE_HAVE_DM_SIG
#define IPE_HAVE_DM_SIG 0
#define IPE_OFF_DM_VERITY_ROOT_DIGEST_SIG 0
#endif

#endif /* IPE_BCC_COMPAT_H */
