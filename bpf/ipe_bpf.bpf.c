// SPDX-License-Identifier: GPL-2.0
/*
 * ipe-bpf: Linux IPE (Integrity Policy Enforcement) decisions as BPF LSM programs.
 *
 * Per event: (op, hook, file-or-NULL) -> the file's attributes -> at most two digest-id
 * lookups and four rule-table lookups in the active slot's compiled tables -> ALLOW/DENY,
 * audited through a ring buffer (every DENY; every ALLOW with success_audit).
 * The decision steps mirror ipe_bpf/policy/compiler.py lookup(); the semantics are
 * ../shared/spec/IPE.md section 2.
 *
 * Load-time constants (-D, from the running kernel's BTF, see ipe_bpf/kernel/btf.py):
 *   IPE_OFF_INODE_VERITY   offsetof(struct inode, i_verity_info)
 *   IPE_OFF_VI_HASH_ALG    offsetof(struct fsverity_info, tree_params.hash_alg)
 *   IPE_OFF_VI_DIGEST      offsetof(struct fsverity_info, file_digest)
 *   IPE_OFF_ALG_NAME       offsetof(struct fsverity_hash_alg, name)
 *   IPE_OFF_ALG_SIZE       offsetof(struct fsverity_hash_alg, digest_size)
 * IPE_HAVE_FSVERITY is defined when all five were found.  IPE_HAVE_OVL and IPE_OFF_OVL_*,
 * IPE_OFF_OE_*, IPE_OFF_OVLPATH_DENTRY, IPE_SIZEOF_OVL_PATH: overlayfs' private layout
 * (module BTF) for d_real_inode().
 *
 * 6.12 verifier facts this file works around (see the comments at each place):
 *  - a trusted hook argument is assumed non-NULL (mmap_file's file can be NULL);
 *  - `const void *` hook arguments cannot be read from the context (setintegrity hooks);
 *  - bpf_d_path() is allowed only in hooks of the sleepable list: bprm_check_security,
 *    mmap_file and kernel_read_file, not file_mprotect, which rebuilds the path itself
 *    (ipe_walk_path, with struct mount's offsets IPE_OFF_MOUNT_* from BTF: IPE_HAVE_MOUNT).
 */
#include <linux/fs.h>
#include <linux/mount.h>
#include <linux/dcache.h>
#include <linux/binfmts.h>
#include <linux/mm.h>
#include <linux/mman.h>
#include <linux/blk_types.h>
#include <linux/kernel_read_file.h>
#include <linux/security.h>
#include <linux/errno.h>
#include <linux/magic.h>
#include <linux/stddef.h>

#include "ipe_bpf.h"
#include "bcc_compat.h"

#define IPE_NO_RULE 0xffffffffU

/* What the decision needs to know about the file behind the event. */
struct ipe_attrs {
	__u32 roothash_id;	/* id of the file's dm-verity root hash in the slot, or 0 */
	__u32 digest_id;	/* id of the file's fs-verity digest in the slot, or 0 */
	__u8 bools;		/* IPE_BOOL_* */
};

struct ipe_decision {
	__u32 index;
	__u8 action;
	__u8 source;
};

/* Copy a kernel byte string of length len (<= IPE_DIGEST_MAX) with verifier-proof sizes. */
static __always_inline void ipe_read_digest(__u8 *dst, const void *src, __u32 len)
{
	if (len >= IPE_DIGEST_MAX)
		bpf_probe_read_kernel(dst, IPE_DIGEST_MAX, src);
	else
		bpf_probe_read_kernel(dst, len & (IPE_DIGEST_MAX - 1), src);
}

/* A NUL-terminated kernel string into an IPE_ALG_MAX array; returns strlen (> IPE_ALG_MAX: too long). */
static __always_inline __u32 ipe_read_alg(char *dst, const char *src)
{
	char tmp[IPE_ALG_MAX + 8] = {};
	long n = bpf_probe_read_kernel_str(tmp, sizeof(tmp), src);

	if (n <= 0)
		return IPE_ALG_MAX + 1;
	__builtin_memcpy(dst, tmp, IPE_ALG_MAX);
	return n - 1 >= IPE_ALG_MAX + 7 ? IPE_ALG_MAX + 1 : (__u32)(n - 1);
}

/* boot_verified: the mount's superblock is the initial rootfs (the initramfs). */
static __always_inline int ipe_sb_is_rootfs(struct super_block *sb)
{
	char name[8] = {};
	const char *type_name;

	if (!sb || !sb->s_type)
		return 0;
	type_name = sb->s_type->name;
	bpf_probe_read_kernel_str(name, sizeof(name), type_name);
	return name[0] == 'r' && name[1] == 'o' && name[2] == 'o' && name[3] == 't' &&
	       name[4] == 'f' && name[5] == 's' && name[6] == 0;
}

static __always_inline __u32 ipe_digest_id(struct ipe_digest_key *key)
{
	__u32 *id = ipe_digest_lookup(key);

	return id ? *id : 0;
}

#define IPE_READ(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), (src))

/*
 * The inode whose properties count (spec section 2: d_real_inode()).  For overlayfs that
 * is the upper inode once copied up, else the lower data inode; the layout of overlayfs'
 * private structs comes from BTF at load time (IPE_HAVE_OVL).  The result may not be a
 * BTF pointer, so the attribute readers below use bpf_probe_read_kernel throughout.
 */
static __always_inline void *ipe_real_inode(struct inode *inode)
{
#ifdef IPE_HAVE_OVL
	void *oi, *dentry = NULL, *oe = NULL, *real = NULL;
	unsigned int n = 0;

	if (!inode->i_sb || inode->i_sb->s_magic != OVERLAYFS_SUPER_MAGIC)
		return inode;
	oi = (void *)inode - IPE_OFF_OVL_VFS_INODE;
	IPE_READ(dentry, oi + IPE_OFF_OVL_UPPER);
	if (!dentry) {
		IPE_READ(oe, oi + IPE_OFF_OVL_OE);
		if (!oe)
			return inode;
		IPE_READ(n, oe + IPE_OFF_OE_NUMLOWER);
		if (n == 0 || n > 512)
			return inode;
		IPE_READ(dentry, oe + IPE_OFF_OE_LOWERSTACK + (n - 1) * IPE_SIZEOF_OVL_PATH +
					 IPE_OFF_OVLPATH_DENTRY);
	}
	if (!dentry)
		return inode;
	IPE_READ(real, dentry + offsetof(struct dentry, d_inode));
	return real ? real : (void *)inode;
#else
	return inode;
#endif
}

static __always_inline void ipe_dmverity_attrs(void *inode, int slot, struct ipe_attrs *a)
{
	void *sb = NULL, *bdev = NULL;
	dev_t dev = 0;
	struct ipe_bdev_state *st;
	struct ipe_digest_key key = {};

	IPE_READ(sb, inode + offsetof(struct inode, i_sb));
	if (!sb)
		return;
	IPE_READ(bdev, sb + offsetof(struct super_block, s_bdev));
	if (!bdev)
		return;
	IPE_READ(dev, bdev + offsetof(struct block_device, bd_dev));
	st = ipe_device_lookup((__u32)dev);
	if (!st)
		return;
	if (st->sig_valid)
		a->bools |= IPE_BOOL_DMV_SIGNATURE;
	if (!st->has_roothash || st->alg_len > IPE_ALG_MAX || st->digest_len > IPE_DIGEST_MAX)
		return;
	key.slot = slot;
	key.kind = IPE_DIGEST_DMVERITY;
	key.alg_len = st->alg_len;
	key.len = st->digest_len;
	__builtin_memcpy(key.alg, st->alg, IPE_ALG_MAX);
	__builtin_memcpy(key.value, st->digest, IPE_DIGEST_MAX);
	a->roothash_id = ipe_digest_id(&key);
}

/* btf_inode: the same inode as a BTF pointer (for inode storage), or NULL if unavailable. */
static __always_inline void ipe_fsverity_attrs(void *inode, struct inode *btf_inode, int slot,
					       struct ipe_attrs *a)
{
#ifdef IPE_HAVE_FSVERITY
	struct ipe_inode_state *ist;
	struct ipe_digest_key key = {};
	void *vi = NULL, *alg = NULL;
	const char *alg_name = NULL;
	unsigned int flags = 0;
	__u32 size = 0, alg_len;

	IPE_READ(flags, inode + offsetof(struct inode, i_flags));
	if (!(flags & S_VERITY))
		return;
	if (btf_inode) {
		ist = ipe_inode_get(btf_inode, 0);
		if (ist && ist->fsv_sig_valid)
			a->bools |= IPE_BOOL_FSV_SIGNATURE;
	}
	IPE_READ(vi, inode + IPE_OFF_INODE_VERITY);
	if (!vi)
		return;
	IPE_READ(alg, vi + IPE_OFF_VI_HASH_ALG);
	if (!alg)
		return;
	IPE_READ(size, alg + IPE_OFF_ALG_SIZE);
	IPE_READ(alg_name, alg + IPE_OFF_ALG_NAME);
	if (size > IPE_DIGEST_MAX || !alg_name)
		return;
	alg_len = ipe_read_alg(key.alg, alg_name);
	if (alg_len > IPE_ALG_MAX)
		return;
	ipe_read_digest(key.value, vi + IPE_OFF_VI_DIGEST, size);
#pragma unroll
	for (int i = 0; i < IPE_DIGEST_MAX; i++)
		if (i >= size)
			key.value[i] = 0;
	key.slot = slot;
	key.kind = IPE_DIGEST_FSVERITY;
	key.alg_len = alg_len;
	key.len = size;
	a->digest_id = ipe_digest_id(&key);
#endif
}

/* Spec section 2 per-file context: inode = d_real_inode(), sb = the mount's superblock. */
static __always_inline void ipe_file_attrs(struct file *file, int slot, struct ipe_attrs *a)
{
	struct inode *inode = file->f_inode;
	struct vfsmount *mnt = file->f_path.mnt;
	void *real;

	if (mnt && ipe_sb_is_rootfs(mnt->mnt_sb))
		a->bools |= IPE_BOOL_BOOT_VERIFIED;
	if (!inode)
		return;
	real = ipe_real_inode(inode);
	ipe_dmverity_attrs(real, slot, a);
	ipe_fsverity_attrs(real, real == (void *)inode ? inode : NULL, slot, a);
}

static __always_inline void ipe_rule_try(struct ipe_rule_key *k, __u8 shape, struct ipe_attrs *a,
					 struct ipe_decision *d)
{
	struct ipe_rule_value *v;

	k->shape = shape;
	k->roothash_id = (shape & IPE_SHAPE_ROOTHASH) ? a->roothash_id : 0;
	k->digest_id = (shape & IPE_SHAPE_FSVERITY) ? a->digest_id : 0;
	v = ipe_rule_lookup(k);
	if (v && v->index < d->index) {
		d->index = v->index;
		d->action = v->action;
		d->source = IPE_SOURCE_RULE;
	}
}

/* First matching rule (lowest index over the shapes), else op default, else global default. */
static __always_inline void ipe_decide(struct ipe_policy_defaults *def, int slot, __u8 op,
				       struct ipe_attrs *a, struct ipe_decision *d)
{
	struct ipe_rule_key k = {};
	__u8 shapes = def->shapes;

	d->index = IPE_NO_RULE;
	d->action = IPE_ACTION_ALLOW;
	d->source = IPE_SOURCE_NONE;
	if (op < IPE_OP_UNKNOWN) {
		k.slot = slot;
		k.op = op;
		k.bools = a->bools;
		if (shapes & (1 << 0))
			ipe_rule_try(&k, 0, a, d);
		if ((shapes & (1 << IPE_SHAPE_ROOTHASH)) && a->roothash_id)
			ipe_rule_try(&k, IPE_SHAPE_ROOTHASH, a, d);
		if ((shapes & (1 << IPE_SHAPE_FSVERITY)) && a->digest_id)
			ipe_rule_try(&k, IPE_SHAPE_FSVERITY, a, d);
		if ((shapes & (1 << (IPE_SHAPE_ROOTHASH | IPE_SHAPE_FSVERITY))) && a->roothash_id &&
		    a->digest_id)
			ipe_rule_try(&k, IPE_SHAPE_ROOTHASH | IPE_SHAPE_FSVERITY, a, d);
		if (d->source == IPE_SOURCE_RULE)
			return;
		if (def->op_default[op & (IPE_NR_OPS - 1)] != IPE_DEFAULT_NONE) {
			d->action = def->op_default[op & (IPE_NR_OPS - 1)];
			d->source = IPE_SOURCE_OP_DEFAULT;
			return;
		}
	}
	if (def->global_default != IPE_DEFAULT_NONE) {
		d->action = def->global_default;
		d->source = IPE_SOURCE_GLOBAL_DEFAULT;
	}
}

#ifdef IPE_HAVE_MOUNT
#define IPE_PATH_DEPTH 24	/* components plus mount crossings */

/*
 * d_path() rebuilt by walking d_parent up to the root, crossing mounts through struct mount
 * (offsets from BTF), for hooks where bpf_d_path() is refused (file_mprotect).  Relative to
 * the initial namespace's root, without d_path's " (deleted)" suffix.  Returns the length,
 * or 0 (too deep or too long: the caller records the name only).
 */
static __always_inline __u32 ipe_walk_path(struct ipe_event *e, struct file *file)
{
	struct ipe_path_scratch *s = ipe_scratch_get();
	void *d = file->f_path.dentry, *vfsmnt = file->f_path.mnt;
	void *mnt, *root = NULL, *parent = NULL, *up = NULL;
	const unsigned char *name = NULL;
	__u32 pos = IPE_PATH_MAX, len = 0, done = 0;

	if (!s || !d || !vfsmnt)
		return 0;
#pragma unroll
	for (int i = 0; i < IPE_PATH_DEPTH; i++) {
		if (done)
			break;
		IPE_READ(root, vfsmnt + offsetof(struct vfsmount, mnt_root));
		if (d == root) {
			mnt = vfsmnt - IPE_OFF_MOUNT_MNT;
			IPE_READ(parent, mnt + IPE_OFF_MOUNT_PARENT);
			if (!parent || parent == mnt) {
				done = 1;
				break;
			}
			IPE_READ(d, mnt + IPE_OFF_MOUNT_MOUNTPOINT);
			vfsmnt = parent + IPE_OFF_MOUNT_MNT;
			continue;
		}
		IPE_READ(up, d + offsetof(struct dentry, d_parent));
		if (!up || up == d) {
			done = 1;
			break;
		}
		IPE_READ(len, d + offsetof(struct dentry, d_name.len));
		IPE_READ(name, d + offsetof(struct dentry, d_name.name));
		if (len + 1 > pos || len > 0xff)
			return 0;
		asm volatile("" : "+r"(len));
		len &= 0xff;
		pos -= len;
		bpf_probe_read_kernel(&s->buf[pos & (IPE_PATH_MAX - 1)], len, name);
		pos -= 1;
		s->buf[pos & (IPE_PATH_MAX - 1)] = '/';
		d = up;
	}
	if (!done)
		return 0;
	if (pos == IPE_PATH_MAX) {	/* the root itself */
		e->path[0] = '/';
		e->path[1] = 0;
		return 1;
	}
	len = IPE_PATH_MAX - pos;
	if (len >= IPE_PATH_MAX)
		return 0;
	/* keep the mask: clang would drop it after the check, and the verifier needs it */
	asm volatile("" : "+r"(len));
	len &= IPE_PATH_MAX - 1;
	bpf_probe_read_kernel(e->path, len, &s->buf[pos & (IPE_PATH_MAX - 1)]);
	e->path[len & (IPE_PATH_MAX - 1)] = 0;
	return len;
}
#endif

static __always_inline void ipe_fill_path(struct ipe_event *e, struct file *file, int use_d_path)
{
	struct dentry *dentry;
	long n = -1;

	e->path[0] = 0;
	e->path_len = 0;
	if (use_d_path) {
		n = bpf_d_path(&file->f_path, e->path, IPE_PATH_MAX);
		if (n > 0) {
			e->path_kind = IPE_PATH_FULL;
			e->path_len = n - 1;
			return;
		}
	}
#ifdef IPE_HAVE_MOUNT
	else {
		n = ipe_walk_path(e, file);
		if (n > 0) {
			e->path_kind = IPE_PATH_FULL;
			e->path_len = n;
			return;
		}
	}
#endif
	dentry = file->f_path.dentry;
	if (dentry) {
		n = bpf_probe_read_kernel_str(e->path, IPE_PATH_MAX, dentry->d_name.name);
		if (n > 0)
			e->path_len = n - 1;
	}
	e->path_kind = IPE_PATH_NAME;
}

static __always_inline void ipe_audit(struct file *file, __u8 op, __u8 hook, __u8 enforcing,
				      struct ipe_decision *d, __u64 generation, int use_d_path,
				      struct ipe_counters *c)
{
	struct ipe_event *e = ipe_event_reserve();
	struct inode *inode;

	if (!e) {
		if (c)
			c->dropped++;
		return;
	}
	if (c)
		c->audited++;
	e->boot_ns = bpf_ktime_get_boot_ns();
	e->generation = generation;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->rule_index = d->index;
	e->op = op;
	e->hook = hook;
	e->enforcing = enforcing;
	e->action = d->action;
	e->source = d->source;
	e->ino = 0;
	e->dev[0] = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	if (!file) {
		e->path_kind = IPE_PATH_NONE;
		e->path_len = 0;
		e->path[0] = 0;
	} else {
		ipe_fill_path(e, file, use_d_path);
		inode = file->f_inode;
		if (inode) {
			e->ino = inode->i_ino;
			if (inode->i_sb)
				bpf_probe_read_kernel_str(e->dev, IPE_SID_LEN, inode->i_sb->s_id);
		}
	}
	ipe_event_submit(e);
}

/* The whole evaluation of one event; returns the hook's return value. */
static __always_inline int ipe_evaluate(struct file *file, __u8 op, __u8 hook, int use_d_path)
{
	struct ipe_config *cfg = ipe_config_get();
	struct ipe_policy_defaults *def;
	struct ipe_counters *c;
	struct ipe_attrs a = {};
	struct ipe_decision d = {};
	__u8 active, enforcing;
	int slot;

	if (!cfg)
		return 0;
	active = *(volatile __u8 *)&cfg->active;
	if (active == IPE_ACTIVE_NONE || active > IPE_SLOTS)
		return 0;
	slot = active - 1;
	def = ipe_defaults_get(slot);
	if (!def)
		return 0;
	if (file)
		ipe_file_attrs(file, slot, &a);
	ipe_decide(def, slot, op, &a, &d);
	enforcing = !cfg->permissive;

	c = ipe_counters_get();
	if (c) {
		if (d.action == IPE_ACTION_DENY)
			c->deny[op & (IPE_NR_OPS - 1)]++;
		else
			c->allow[op & (IPE_NR_OPS - 1)]++;
	}
	if (d.action == IPE_ACTION_DENY || cfg->success_audit)
		ipe_audit(file, op, hook, enforcing, &d, def->generation, use_d_path, c);
	if (d.action == IPE_ACTION_DENY && enforcing)
		return -EACCES;
	return 0;
}

/* kernel_read_file / kernel_load_data ids -> op (the READING_* and LOADING_* enums share order). */
static __always_inline __u8 ipe_read_id_op(int id)
{
	switch (id) {
	case READING_FIRMWARE:
		return IPE_OP_FIRMWARE;
	case READING_MODULE:
		return IPE_OP_KMODULE;
	case READING_KEXEC_IMAGE:
		return IPE_OP_KEXEC_IMAGE;
	case READING_KEXEC_INITRAMFS:
		return IPE_OP_KEXEC_INITRAMFS;
	case READING_POLICY:
		return IPE_OP_POLICY;
	case READING_X509_CERTIFICATE:
		return IPE_OP_X509_CERT;
	default:
		return IPE_OP_UNKNOWN;
	}
}

static __always_inline __u8 ipe_load_id_op(int id)
{
	switch (id) {
	case LOADING_FIRMWARE:
		return IPE_OP_FIRMWARE;
	case LOADING_MODULE:
		return IPE_OP_KMODULE;
	case LOADING_KEXEC_IMAGE:
		return IPE_OP_KEXEC_IMAGE;
	case LOADING_KEXEC_INITRAMFS:
		return IPE_OP_KEXEC_INITRAMFS;
	case LOADING_POLICY:
		return IPE_OP_POLICY;
	case LOADING_X509_CERTIFICATE:
		return IPE_OP_X509_CERT;
	default:
		return IPE_OP_UNKNOWN;
	}
}

/* ---------------------------------------------------------------- decision hooks */

/*
 * 6.12's verifier cannot give a BPF LSM program a `const void *` argument (the BTF walk
 * stops at the const modifier: "arg2 type UNKNOWN is not a struct"), so `value` (ctx[2])
 * is read with bpf_probe_read_kernel from the context instead of being declared.
 */
static __always_inline const void *ipe_ctx_ptr(unsigned long long *ctx, int i)
{
	const void *p = NULL;

	bpf_probe_read_kernel(&p, sizeof(p), &ctx[i]);
	return p;
}


IPE_HOOK(bprm_check_security, struct linux_binprm *bprm)
{
	return ipe_evaluate(bprm->file, IPE_OP_EXECUTE, IPE_HOOK_BPRM_CHECK, 1);
}

IPE_HOOK(mmap_file, struct file *file, unsigned long reqprot, unsigned long prot, unsigned long flags)
{
	if (!(prot & PROT_EXEC))
		return 0;
	/*
	 * file is NULL for anonymous memory, but 6.12's verifier treats a trusted hook argument
	 * as never NULL: it drops `if (file)` as dead code and emits unguarded loads (a NULL
	 * dereference in the kernel).  Test a copy laundered through bpf_probe_read_kernel.
	 */
	if (!ipe_ctx_ptr(ctx, 0))
		return ipe_evaluate(NULL, IPE_OP_EXECUTE, IPE_HOOK_MMAP, 0);
	return ipe_evaluate(file, IPE_OP_EXECUTE, IPE_HOOK_MMAP, 1);
}

IPE_HOOK(file_mprotect, struct vm_area_struct *vma, unsigned long reqprot, unsigned long prot)
{
	struct file *file;

	if (vma->vm_flags & VM_EXEC)
		return 0;
	if (!(prot & PROT_EXEC))
		return 0;
	file = vma->vm_file;
	if (file)
		return ipe_evaluate(file, IPE_OP_EXECUTE, IPE_HOOK_MPROTECT, 0);
	return ipe_evaluate(NULL, IPE_OP_EXECUTE, IPE_HOOK_MPROTECT, 0);
}

IPE_HOOK(kernel_read_file, struct file *file, enum kernel_read_file_id id, bool contents)
{
	if (!file)
		return ipe_evaluate(NULL, ipe_read_id_op(id), IPE_HOOK_KERNEL_READ, 0);
	return ipe_evaluate(file, ipe_read_id_op(id), IPE_HOOK_KERNEL_READ, 1);
}

IPE_HOOK(kernel_load_data, enum kernel_load_data_id id, bool contents)
{
	return ipe_evaluate(NULL, ipe_load_id_op(id), IPE_HOOK_KERNEL_LOAD, 0);
}

/* ---------------------------------------------------------------- property capture hooks */

IPE_HOOK(bdev_setintegrity, struct block_device *bdev, enum lsm_integrity_type type)
{
	const void *value = ipe_ctx_ptr(ctx, 2);
	size_t size = ctx[3];
	struct ipe_bdev_state st = {};
	struct ipe_bdev_state *old;
	struct dm_verity_digest dg = {};
	__u32 dev = bdev->bd_dev;
	__u32 alg_len;
	__u64 len;

	if (type != LSM_INT_DMVERITY_SIG_VALID && type != LSM_INT_DMVERITY_ROOTHASH)
		return 0;
	old = ipe_device_lookup(dev);
	if (old)
		__builtin_memcpy(&st, old, sizeof(st));
	st.seeded = 0;
	if (type == LSM_INT_DMVERITY_SIG_VALID) {
		st.sig_valid = value && size ? 1 : 0;
	} else if (!value) {
		st.has_roothash = 0;
		st.alg_len = 0;
		st.digest_len = 0;
		__builtin_memset(st.alg, 0, sizeof(st.alg));
		__builtin_memset(st.digest, 0, sizeof(st.digest));
	} else {
		bpf_probe_read_kernel(&dg, sizeof(dg), value);
		__builtin_memset(st.alg, 0, sizeof(st.alg));
		__builtin_memset(st.digest, 0, sizeof(st.digest));
		alg_len = dg.alg ? ipe_read_alg(st.alg, dg.alg) : IPE_ALG_MAX + 1;
		len = dg.digest_len;
		st.has_roothash = 1;
		st.alg_len = alg_len > 255 ? 255 : alg_len;
		if (len > IPE_DIGEST_MAX || !dg.digest) {
			st.digest_len = 255;	/* can never match */
		} else {
			ipe_read_digest(st.digest, dg.digest, len);
#pragma unroll
			for (int i = 0; i < IPE_DIGEST_MAX; i++)
				if (i >= len)
					st.digest[i] = 0;
			st.digest_len = len;
		}
	}
	ipe_device_update(dev, &st);
	return 0;
}

IPE_HOOK(bdev_free_security, struct block_device *bdev)
{
	ipe_device_delete((__u32)bdev->bd_dev);
	return 0;
}

IPE_HOOK(inode_setintegrity, const struct inode *inode, enum lsm_integrity_type type)
{
	const void *value = ipe_ctx_ptr(ctx, 2);
	size_t size = ctx[3];
	struct ipe_inode_state *st;

	if (type != LSM_INT_FSVERITY_BUILTINSIG_VALID)
		return 0;
	st = ipe_inode_get(inode, 1);
	if (st)
		st->fsv_sig_valid = value && size ? 1 : 0;
	return 0;
}
