/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The libbpf / CO-RE side of the program: the twin of bcc_compat.h.  scripts/build-bpf
 * compiles ipe_bpf.bpf.c with -DIPE_CORE against vmlinux.h (the 6.12 kernel's types); every
 * access to a kernel struct goes through a CO-RE relocation, so the one object loads on every
 * kernel whose BTF has the fields, and what a kernel lacks is tested with bpf_core_*_exists()
 * in C (a failed relocation in a branch the verifier never takes is harmless).
 *
 * Types that vmlinux.h lacks (they live in modules: overlayfs, device-mapper, dm-verity) or
 * that changed between kernel lines are declared below as "flavours" (name___ipe...): libbpf
 * matches them to the running kernel's type of the name before the three underscores, in
 * vmlinux or in any loaded module's BTF, member by member name.
 *
 * Map sizes of 1 are placeholders: the loader sets max_entries before loading (the tables'
 * templates excepted: the control plane sizes each table it makes).
 */
#ifndef IPE_LIBBPF_COMPAT_H
#define IPE_LIBBPF_COMPAT_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "ipe_bpf.h"

/* uapi and kernel macros that BTF cannot carry (stable ABI values) */
#define PROT_EXEC 0x4
#define VM_EXEC 0x00000004
#define EACCES 13
#define OVERLAYFS_SUPER_MAGIC 0x794c7630
#define FS_VERITY_HASH_ALG_SHA256 1
#define FS_VERITY_HASH_ALG_SHA512 2

/* One BPF LSM program per hook, named ipe_<hook>; the loader pins its link as <hook>. */
#define IPE_HOOK(name, args...) SEC("lsm/" #name) int BPF_PROG(ipe_##name, args)

/* ------------------------------------------------------------------ maps */

/*
 * The policy maps are BPF_F_RDONLY_PROG: the program only reads them, and no other BPF
 * program can write them either (the verifier refuses, also through map-in-map); the control
 * plane writes them with bpf(), until the seal freezes them (docs/seal.md).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_RDONLY_PROG);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ipe_config);
} ipe_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_RDONLY_PROG);
	__uint(max_entries, IPE_SLOTS);
	__type(key, __u32);
	__type(value, struct ipe_policy_defaults);
} ipe_defaults SEC(".maps");

/*
 * The digests and rules tables: one hash map per slot, made by the control plane for each
 * policy it installs, sized to it, and put into these arrays of maps (ipe_bpf/kernel/maps.py).
 * The structs below are the templates the tables must match (type, key, value, flags); they
 * give sizes, not types: a type seen only through them would reach BTF as a bare forward.
 * Preallocated: a table is made for exactly its policy's entries, and filling preallocated
 * elements costs the kernel 0.30 s for a 100k-rule policy where allocating each one took 0.37 s.
 */
struct ipe_digests_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_RDONLY_PROG);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(struct ipe_digest_key));
	__uint(value_size, sizeof(struct ipe_digest_value));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, IPE_SLOTS);
	__type(key, __u32);
	__array(values, struct ipe_digests_table);
} ipe_digests SEC(".maps");

struct ipe_rules_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_RDONLY_PROG);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(struct ipe_rule_key));
	__uint(value_size, sizeof(struct ipe_rule_value));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, IPE_SLOTS);
	__type(key, __u32);
	__array(values, struct ipe_rules_table);
} ipe_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_RDONLY_PROG);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ipe_seal);
} ipe_seal SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ipe_bdev_state);
} ipe_devices SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ipe_counters);
} ipe_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} ipe_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_INODE_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ipe_inode_state);
} ipe_inodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ipe_path_scratch);
} ipe_scratch SEC(".maps");

/*
 * A decision cached per inode (op EXECUTE only: exec, mmap, mprotect): valid while the active
 * slot's epoch, the file's verity state and the count of dm-verity device changes are what
 * they were when it was made.  An entry is never written after it is created: a new decision
 * replaces it (delete, then create with the whole value), so a reader needs no lock to see one
 * whole value, and the map has no special field (the seal can freeze it).
 */
struct ipe_cached {
	__u32 index;
	__u32 dev_changes;
	__u8 action;
	__u8 source;
	__u8 split;
	__u8 verity;
	__u64 epoch;		/* ipe_policy_defaults.epoch; 0: nothing cached */
};

struct {
	__uint(type, BPF_MAP_TYPE_INODE_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ipe_cached);
} ipe_cache SEC(".maps");

/* How many times the bdev_setintegrity / bdev_free_security hooks changed a device. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ipe_dev_changes SEC(".maps");

#define IPE_HAVE_CACHE 1

#define ipe_map_lookup(map, key) bpf_map_lookup_elem(&(map), key)
#define ipe_map_update(map, key, value) bpf_map_update_elem(&(map), key, value, BPF_ANY)
#define ipe_map_delete(map, key) bpf_map_delete_elem(&(map), key)
#define ipe_ringbuf_reserve(map, size) bpf_ringbuf_reserve(&(map), size, 0)
#define ipe_ringbuf_submit(e) bpf_ringbuf_submit(e, 0)
#define ipe_inode_storage(map, inode, flags) bpf_inode_storage_get(&(map), (void *)(inode), 0, flags)

/* ------------------------------------------------------------------ kernel access */

/* Read a member of a kernel struct at ptr (any pointer, typed or not) into dst. */
#define IPE_FIELD(dst, ptr, type, member) \
	bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(ptr) + bpf_core_field_offset(type, member))
#define IPE_HAS_FIELD(type, member) bpf_core_field_exists(type, member)
#define IPE_OFFSET(type, member) bpf_core_field_offset(type, member)
#define IPE_SIZEOF(type) bpf_core_type_size(type)
#define IPE_ENUM(type, name) bpf_core_enum_value(type, name)
#define IPE_HAS_ENUM(type, name) bpf_core_enum_value_exists(type, name)
#define IPE_CORE_BARRIER(x) asm volatile("" : "+r"(x))

/*
 * fs-verity digest of a file by kfunc (7.x keeps no i_verity_info in struct inode).  Called only
 * where the loader found the kfunc (ipe_load.fsverity_kfunc, frozen .rodata): the verifier drops
 * the call elsewhere, so kernels without it load the same object.
 */
extern int bpf_get_fsverity_digest(struct file *file, struct bpf_dynptr *digest_ptr) __ksym __weak;

/* kernel_read_file / kernel_load_data ids added after 6.12 (compressed modules, 7.x). */
enum kernel_read_file_id___ipe {
	READING_MODULE_COMPRESSED___ipe = 7,
};
enum kernel_load_data_id___ipe {
	LOADING_MODULE_COMPRESSED___ipe = 7,
};
#define IPE_HAVE_READING_MODULE_COMPRESSED \
	IPE_HAS_ENUM(enum kernel_read_file_id___ipe, READING_MODULE_COMPRESSED___ipe)
#define IPE_READING_MODULE_COMPRESSED \
	IPE_ENUM(enum kernel_read_file_id___ipe, READING_MODULE_COMPRESSED___ipe)
#define IPE_HAVE_LOADING_MODULE_COMPRESSED \
	IPE_HAS_ENUM(enum kernel_load_data_id___ipe, LOADING_MODULE_COMPRESSED___ipe)
#define IPE_LOADING_MODULE_COMPRESSED \
	IPE_ENUM(enum kernel_load_data_id___ipe, LOADING_MODULE_COMPRESSED___ipe)

/* overlayfs (module), layout since 6.5: the lower stack hangs off the inode. */
struct ovl_path___ipe {
	struct dentry *dentry;
} __attribute__((preserve_access_index));

struct ovl_entry___ipe {
	unsigned int __numlower;
	struct ovl_path___ipe __lowerstack[0];
} __attribute__((preserve_access_index));

struct ovl_inode___ipe {
	struct inode vfs_inode;
	struct dentry *__upperdentry;
	struct ovl_entry___ipe *oe;
} __attribute__((preserve_access_index));

/* overlayfs up to 6.4 (6.1): the inode keeps its lower path itself. */
struct ovl_inode___ipe61 {
	struct inode vfs_inode;
	struct dentry *__upperdentry;
	struct ovl_path___ipe lowerpath;
} __attribute__((preserve_access_index));

/* device-mapper (module dm_mod) and dm-verity (module dm_verity): the live table. */
struct target_type___ipe {
	const char *name;
} __attribute__((preserve_access_index));

struct dm_target___ipe {
	struct target_type___ipe *type;
	void *private;
} __attribute__((preserve_access_index));

struct dm_table___ipe {
	unsigned int num_targets;
	struct dm_target___ipe *targets;
} __attribute__((preserve_access_index));

struct mapped_device___ipe {
	void *map;
} __attribute__((preserve_access_index));

struct dm_verity___ipe {
	char *alg_name;
	u8 *root_digest;
	unsigned int digest_size;
	u8 *root_digest_sig;	/* 6.12+: kept only when the signature verified */
	unsigned int sig_size;
} __attribute__((preserve_access_index));

#define IPE_T_OVL_PATH struct ovl_path___ipe
#define IPE_T_OVL_ENTRY struct ovl_entry___ipe
#define IPE_T_OVL_INODE struct ovl_inode___ipe
#define IPE_T_OVL_INODE61 struct ovl_inode___ipe61
#define IPE_T_TARGET_TYPE struct target_type___ipe
#define IPE_T_DM_TARGET struct dm_target___ipe
#define IPE_T_DM_TABLE struct dm_table___ipe
#define IPE_T_MAPPED_DEVICE struct mapped_device___ipe
#define IPE_T_DM_VERITY struct dm_verity___ipe

/* Offsets into the structs above and into other private ones (bcc_compat.h: -D constants). */
#define IPE_OFF_INODE_VERITY IPE_OFFSET(struct inode, i_verity_info)
#define IPE_OFF_FSVERITY_INFO_HASH_ALG IPE_OFFSET(struct fsverity_info, tree_params.hash_alg)
#define IPE_OFF_FSVERITY_INFO_DIGEST IPE_OFFSET(struct fsverity_info, file_digest)
#define IPE_OFF_HASH_ALG_NAME IPE_OFFSET(struct fsverity_hash_alg, name)
#define IPE_OFF_HASH_ALG_SIZE IPE_OFFSET(struct fsverity_hash_alg, digest_size)
#define IPE_OFF_OVL_INODE_VFS_INODE IPE_OFFSET(IPE_T_OVL_INODE, vfs_inode)
#define IPE_OFF_OVL_INODE_UPPER IPE_OFFSET(IPE_T_OVL_INODE, __upperdentry)
#define IPE_OFF_OVL_INODE_OE IPE_OFFSET(IPE_T_OVL_INODE, oe)
#define IPE_OFF_OVL_INODE_LOWERPATH IPE_OFFSET(IPE_T_OVL_INODE61, lowerpath)
#define IPE_OFF_OVL_ENTRY_NUMLOWER IPE_OFFSET(IPE_T_OVL_ENTRY, __numlower)
#define IPE_OFF_OVL_ENTRY_LOWERSTACK IPE_OFFSET(IPE_T_OVL_ENTRY, __lowerstack)
#define IPE_OFF_OVL_PATH_DENTRY IPE_OFFSET(IPE_T_OVL_PATH, dentry)
#define IPE_SIZEOF_OVL_PATH IPE_SIZEOF(IPE_T_OVL_PATH)
#define IPE_OFF_MOUNT_MNT IPE_OFFSET(struct mount, mnt)
#define IPE_OFF_MOUNT_PARENT IPE_OFFSET(struct mount, mnt_parent)
#define IPE_OFF_MOUNT_MOUNTPOINT IPE_OFFSET(struct mount, mnt_mountpoint)
#define IPE_OFF_MAPPED_DEVICE_MAP IPE_OFFSET(IPE_T_MAPPED_DEVICE, map)
#define IPE_OFF_DM_TABLE_NUM_TARGETS IPE_OFFSET(IPE_T_DM_TABLE, num_targets)
#define IPE_OFF_DM_TABLE_TARGETS IPE_OFFSET(IPE_T_DM_TABLE, targets)
#define IPE_OFF_DM_TARGET_TYPE IPE_OFFSET(IPE_T_DM_TARGET, type)
#define IPE_OFF_DM_TARGET_PRIVATE IPE_OFFSET(IPE_T_DM_TARGET, private)
#define IPE_OFF_TARGET_TYPE_NAME IPE_OFFSET(IPE_T_TARGET_TYPE, name)
#define IPE_OFF_DM_VERITY_ALG_NAME IPE_OFFSET(IPE_T_DM_VERITY, alg_name)
#define IPE_OFF_DM_VERITY_ROOT_DIGEST IPE_OFFSET(IPE_T_DM_VERITY, root_digest)
#define IPE_OFF_DM_VERITY_DIGEST_SIZE IPE_OFFSET(IPE_T_DM_VERITY, digest_size)
#define IPE_OFF_DM_VERITY_ROOT_DIGEST_SIG IPE_OFFSET(IPE_T_DM_VERITY, root_digest_sig)

/* What this kernel has, decided by relocation at load time. */
#define IPE_HAVE_OVL (IPE_HAS_FIELD(IPE_T_OVL_INODE, oe))
#define IPE_HAVE_OVL61 (IPE_HAS_FIELD(IPE_T_OVL_INODE61, lowerpath))
#define IPE_HAVE_DM_TABLE (IPE_HAS_FIELD(IPE_T_MAPPED_DEVICE, map) && \
			   IPE_HAS_FIELD(IPE_T_DM_VERITY, root_digest))
#define IPE_HAVE_DM_SIG (IPE_HAS_FIELD(IPE_T_DM_VERITY, root_digest_sig))
#define IPE_HAVE_INODE_VERITY (IPE_HAS_FIELD(struct inode, i_verity_info))
#define IPE_HAVE_MOUNT (IPE_HAS_FIELD(struct mount, mnt_parent))
#define IPE_HAVE_LOGINUID (IPE_HAS_FIELD(struct task_struct, loginuid))

#endif /* IPE_LIBBPF_COMPAT_H */
