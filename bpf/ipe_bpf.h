/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Structs and constants shared by the BPF-LSM program and the Python control plane.
 * Python derives every layout below from this file (ipe_bpf/policy/layout.py); do not
 * restate them by hand elsewhere.
 */
#ifndef IPE_BPF_H
#define IPE_BPF_H

#define IPE_NR_OPS 8		/* policy ops 0..6 plus UNKNOWN (7) */
#define IPE_OP_EXECUTE 0
#define IPE_OP_FIRMWARE 1
#define IPE_OP_KMODULE 2
#define IPE_OP_KEXEC_IMAGE 3
#define IPE_OP_KEXEC_INITRAMFS 4
#define IPE_OP_POLICY 5
#define IPE_OP_X509_CERT 6
#define IPE_OP_UNKNOWN 7	/* an unmapped kernel_read_file / kernel_load_data id */
#define IPE_ALG_MAX 16		/* longest digest algorithm name that can match */
#define IPE_DIGEST_MAX 64	/* longest digest that can match (sha512, blake2b-512) */
#define IPE_SLOTS 2		/* policy tables are double-buffered: slot 0 and slot 1 */
#define IPE_DEFAULT_NONE 0xff	/* no per-op / global default */

#define IPE_ACTION_ALLOW 0
#define IPE_ACTION_DENY 1

#define IPE_DIGEST_DMVERITY 1
#define IPE_DIGEST_FSVERITY 2

#define IPE_SHAPE_ROOTHASH 1	/* the rule tests dmverity_roothash */
#define IPE_SHAPE_FSVERITY 2	/* the rule tests fsverity_digest */

#define IPE_BOOL_BOOT_VERIFIED 1
#define IPE_BOOL_DMV_SIGNATURE 2
#define IPE_BOOL_FSV_SIGNATURE 4

#define IPE_NO_RULE 0xffffffff	/* a rule index: none */

/*
 * digests map: a digest that the policy in `slot` names -> its id (> 0), and, when exactly one
 * rule names it and that rule tests nothing else (`op=X fsverity_digest=D action=A`, the
 * common case), that rule: its index, op and action.  Such a rule has no rules map entry.
 */
struct ipe_digest_key {
	__u8 slot;
	__u8 kind;		/* IPE_DIGEST_* */
	__u8 alg_len;
	__u8 len;
	char alg[IPE_ALG_MAX];
	__u8 value[IPE_DIGEST_MAX];
};

struct ipe_digest_value {
	__u32 id;
	__u32 index;		/* the one rule's index, or IPE_NO_RULE */
	__u8 op;		/* IPE_OP_* of the one rule */
	__u8 action;		/* IPE_ACTION_* of the one rule */
	__u8 pad[2];
};

/*
 * rules map: (slot, op, shape, the file's digest ids for that shape, the file's three
 * boolean attributes) -> the lowest index of a rule of that shape that matches.
 */
struct ipe_rule_key {
	__u8 slot;
	__u8 op;
	__u8 shape;		/* IPE_SHAPE_* bits */
	__u8 bools;		/* IPE_BOOL_* bits, the file's values */
	__u32 roothash_id;	/* 0 unless shape has IPE_SHAPE_ROOTHASH */
	__u32 digest_id;	/* 0 unless shape has IPE_SHAPE_FSVERITY */
};

struct ipe_rule_value {
	__u32 index;		/* position of the rule in the policy (file order) */
	__u8 action;		/* IPE_ACTION_* */
	__u8 pad[3];
};

/* defaults map (array, index = slot): what applies when no rule matches. */
struct ipe_policy_defaults {
	__u8 op_default[IPE_NR_OPS];	/* IPE_ACTION_* or IPE_DEFAULT_NONE */
	__u8 global_default;		/* IPE_ACTION_* or IPE_DEFAULT_NONE */
	__u8 shapes;			/* bit s set: some rule has shape s (0..3) */
	__u8 bool_mask;			/* IPE_BOOL_* some rule tests: the only bits rule keys carry */
	__u8 pad[5];
	__u64 generation;		/* which deployed policy fills this slot */
	__u64 epoch;			/* unique per install (the config's flips after it): tags cached decisions */
};

/* ------------------------------------------------------------------------------------
 * Runtime state of the loaded program (ipe_bpf/kernel/ reads and writes these maps).
 * Every zero-filled struct below is a safe initial state: no policy, enforcing.
 */

#define IPE_NR_HOOKS 5
#define IPE_HOOK_BPRM_CHECK 0
#define IPE_HOOK_MMAP 1
#define IPE_HOOK_MPROTECT 2
#define IPE_HOOK_KERNEL_READ 3
#define IPE_HOOK_KERNEL_LOAD 4

#define IPE_SOURCE_RULE 0	/* a rule matched: ipe_event.rule_index is its index */
#define IPE_SOURCE_OP_DEFAULT 1
#define IPE_SOURCE_GLOBAL_DEFAULT 2
#define IPE_SOURCE_NONE 3	/* UNKNOWN op and no global default: allowed */

#define IPE_ACTIVE_NONE 0	/* ipe_config.active: no policy (allow, no audit) */

/* config map (array, one entry, key 0). */
struct ipe_config {
	__u8 active;		/* IPE_ACTIVE_NONE, or 1 + the slot whose tables are live */
	__u8 permissive;	/* 1: DENY is audited but not enforced (IPE enforce=0) */
	__u8 success_audit;	/* 1: ALLOW decisions are audited too */
	__u8 pad[5];
	__u64 flips;		/* how many times `active` changed (for status) */
};

#define IPE_COMM_LEN 16
#define IPE_SID_LEN 32
#define IPE_PATH_MAX 512

#define IPE_PATH_NONE 0		/* no file: path=? dev=? ino=? */
#define IPE_PATH_FULL 1		/* path holds the d_path() of the file */
#define IPE_PATH_NAME 2		/* path holds only the dentry name (d_path not possible) */

/*
 * ring buffer record: one audited decision (IPE's 1420 AUDIT_IPE_ACCESS), with what the kernel's
 * accompanying SYSCALL record says of the subject (uid, auid, ses, exe).
 */
#define IPE_EXE_MAX 256
#define IPE_ID_UNSET 0xffffffff	/* auid / ses never set (AUDIT_UID_UNSET), or unknown */

#define IPE_KIND_DECISION 0
#define IPE_KIND_SEAL 1	/* op: IPE_SEAL_*, rule_index: detail, ino: object id, path: its name */

struct ipe_event {
	__u64 boot_ns;		/* bpf_ktime_get_boot_ns() */
	__u64 generation;	/* defaults[slot].generation of the policy that decided */
	__u64 ino;
	__u32 pid;		/* tgid */
	__u32 rule_index;	/* valid when source is IPE_SOURCE_RULE */
	__u32 uid;		/* the task's real uid (initial user namespace) */
	__u32 auid;		/* its login uid, IPE_ID_UNSET if none */
	__u32 ses;		/* its audit session id, IPE_ID_UNSET if none */
	__u8 op;		/* 0..6, IPE_OP_UNKNOWN */
	__u8 hook;		/* IPE_HOOK_* */
	__u8 enforcing;
	__u8 action;		/* IPE_ACTION_* */
	__u8 source;		/* IPE_SOURCE_* */
	__u8 path_kind;		/* IPE_PATH_* */
	__u16 path_len;		/* bytes of path used, without a NUL */
	__u8 exe_kind;		/* IPE_PATH_* of exe: the task's executable at decision time */
	__u8 kind;		/* IPE_KIND_*: a decision, or a refused attempt against the seal */
	__u16 exe_len;
	char comm[IPE_COMM_LEN];
	char dev[IPE_SID_LEN];	/* superblock s_id */
	char path[IPE_PATH_MAX];
	char exe[IPE_EXE_MAX];
};

/*
 * per-CPU scratch (array, one entry): a path rebuilt from its end where bpf_d_path() is refused,
 * and the buffer bpf_get_fsverity_digest() fills (a dynptr over the stack is refused by 7.x).
 */
#define IPE_PATH_SCRATCH 1024	/* 2 * IPE_PATH_MAX: masked offsets plus a name stay inside */

struct ipe_path_scratch {
	char buf[IPE_PATH_SCRATCH];
	/* the layout of the kernel's struct fsverity_digest, in that order */
	__u16 fsv_alg;
	__u16 fsv_size;
	__u8 fsv_digest[IPE_DIGEST_MAX];
};

/* counters map (per-CPU array, one entry): decisions per op, and ring buffer drops. */
struct ipe_counters {
	__u64 allow[IPE_NR_OPS];
	__u64 deny[IPE_NR_OPS];
	__u64 audited;
	__u64 dropped;		/* ring buffer full: the event was lost, the decision was not */
	__u64 undecidable;	/* the answer hung on a signature state the program has no record of: denied */
	__u64 seal_refused;	/* attempts against the seal refused (EPERM) */
};

/*
 * devices map (hash, key: kernel dev_t as __u32 = major << 20 | minor): dm-verity state the
 * bdev_setintegrity hook captured.  Devices it did not see (set up before load, or kernels
 * without the hook) are recognised from their live device-mapper table instead.
 */
struct ipe_bdev_state {
	__u8 has_roothash;
	__u8 sig_valid;		/* LSM_INT_DMVERITY_SIG_VALID with a non-empty value */
	__u8 alg_len;		/* strlen of the algorithm name (may exceed IPE_ALG_MAX) */
	__u8 digest_len;
	__u8 pad[4];
	char alg[IPE_ALG_MAX];
	__u8 digest[IPE_DIGEST_MAX];
};

/*
 * inode storage: what the program saw of an fs-verity file.  fsv_observed: its verity info was
 * set up while the program was loaded (first open, or FS_IOC_ENABLE_VERITY), so a built-in
 * signature would have been reported through inode_setintegrity: fsv_sig_valid is the truth.
 * A verity file without fsv_observed had its signature checked before load: unknown.
 */
struct ipe_inode_state {
	__u8 fsv_sig_valid;	/* LSM_INT_FSVERITY_BUILTINSIG_VALID with a signature */
	__u8 fsv_observed;
	__u8 fsv_set_up;	/* its verity info was there at an open (kfunc kernels: not asked again) */
	__u8 pad[5];
};

/* ------------------------------------------------------------------------------------
 * The seal (docs/seal.md): once ipe_seal.sealed is 1, until reboot, the program refuses the
 * bpf(), bpffs and mount operations that could change what it enforces.  The control plane
 * fills the one entry (key 0) with the ids and places of what is ipe-bpf's, sets sealed and
 * freezes the map; the program only reads it (BPF_F_RDONLY_PROG).
 */
#define IPE_SEAL_MAPS 16
#define IPE_SEAL_PROGS 32	/* programs, and as many links */
#define IPE_SEAL_DIRS 4		/* the pin folders: root, maps, links */
#define IPE_SEAL_POINTS 8	/* paths leading to the pins: nothing may be mounted on them */

/* Refused attempts (ipe_event.op of an IPE_KIND_SEAL record). */
#define IPE_SEAL_MAP_WRITE 1	/* bpf() writing, deleting or freezing a map of ours (rule_index: cmd) */
#define IPE_SEAL_LINK_WRITE 2	/* bpf() detaching or updating a link of ours (rule_index: cmd) */
#define IPE_SEAL_PROG_LOAD 3	/* a program that could override decisions (rule_index: IPE_REFUSE_*) */
#define IPE_SEAL_UNLINK 4	/* unlink, rmdir or rename in the pin folders */
#define IPE_SEAL_UMOUNT 5	/* unmounting the bpffs or a mount above it (rule_index: flags) */
#define IPE_SEAL_MOUNT 6	/* mounting on, or moving, the pins' path (rule_index: flags) */

/* Why a program is refused (rule_index of IPE_SEAL_PROG_LOAD). */
#define IPE_REFUSE_LSM 1	/* BPF_PROG_TYPE_LSM: runs in the trampolines of our hooks */
#define IPE_REFUSE_FMOD_RET 2	/* fmod_ret: replaces a security_*() function's result */
#define IPE_REFUSE_OVERRIDE 3	/* a kprobe calling bpf_override_return */
#define IPE_REFUSE_TARGET 4	/* fentry / fexit / freplace on a program of ours, freplace of an LSM one */
#define IPE_REFUSE_MAP_ITER 5	/* a bpf_map_elem iterator: writes any map it is given */
#define IPE_REFUSE_USES_MAP 6	/* uses a map of ours, or a map-in-map that could hold one */

struct ipe_seal {
	__u8 sealed;
	__u8 pad[3];
	__u32 bpffs_dev;			/* kernel dev_t of the bpffs holding the pins */
	__u64 sealed_at;			/* CLOCK_REALTIME ns (status) */
	__u64 sealed_boot_ns;			/* CLOCK_BOOTTIME ns: programs loaded later are checked */
	__u32 nr_maps;
	__u32 nr_progs;
	__u32 nr_links;
	__u32 nr_dirs;
	__u32 nr_points;
	__u32 pad2;
	__u32 map_id[IPE_SEAL_MAPS];		/* map_id[0]: ipe_seal's own */
	__u32 map_type[IPE_SEAL_MAPS];		/* what a map-in-map template would have to match */
	__u32 map_key_size[IPE_SEAL_MAPS];
	__u32 map_value_size[IPE_SEAL_MAPS];
	__u32 map_flags[IPE_SEAL_MAPS];
	__u32 prog_id[IPE_SEAL_PROGS];
	__u32 link_id[IPE_SEAL_PROGS];
	__u32 dir_dev[IPE_SEAL_DIRS];		/* kernel dev_t and inode number of each pin folder */
	__u64 dir_ino[IPE_SEAL_DIRS];
	__u32 point_mnt[IPE_SEAL_POINTS];	/* mount id and inode number of each path */
	__u64 point_ino[IPE_SEAL_POINTS];	/*   from / down to the pin root (statx) */
};

#endif /* IPE_BPF_H */
