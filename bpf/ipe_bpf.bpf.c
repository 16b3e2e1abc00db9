// SPDX-License-Identifier: GPL-2.0
/*
 * ipe-bpf: Linux IPE (Integrity Policy Enforcement) decisions as BPF LSM programs.
 *
 * Per event: (op, hook, file-or-NULL) -> the file's attributes -> at most two digest-id
 * lookups and four rule-table lookups in the active slot's compiled tables -> ALLOW/DENY,
 * audited through a ring buffer (every DENY; every ALLOW with success_audit).
 * The decision steps mirror ipe_bpf/policy/compiler.py lookup(); docs/design.md describes
 * the tables and docs/policy-language.md the semantics.
 *
 * Built two ways from this one source:
 *  - CO-RE (-DIPE_CORE, libbpf_compat.h): the prebuilt object scripts/build-bpf commits as
 *    ipe_bpf.bpf.o; kernel structs are reached through CO-RE relocations and what a kernel
 *    lacks is tested at load time (IPE_HAVE_* are relocated constants);
 *  - BCC (bcc_compat.h): compiled at load time against the running kernel's headers, the
 *    private structs' offsets passed as -D constants (ipe_bpf/kernel/btf.py).
 * Both headers define the same names: maps, IPE_HOOK(), IPE_FIELD() for public structs,
 * IPE_OFF_* for private ones and IPE_HAVE_* for what the running kernel has.
 *
 * Verifier facts this file works around (6.1 to 7.x; see the comments at each place):
 *  - a trusted hook argument is assumed non-NULL (mmap_file's file can be NULL);
 *  - `const void *` hook arguments cannot be read from the context (setintegrity hooks);
 *  - bpf_d_path() is allowed only in bprm_check_security, mmap_file and kernel_read_file,
 *    not file_mprotect, which rebuilds the path itself (ipe_walk_into).
 */
#ifdef IPE_CORE
#include "libbpf_compat.h"
#else
#include "bcc_compat.h"
#endif

#ifdef IPE_CORE
/* Set by the loader before load from what it probed (frozen: the verifier prunes by them). */
const volatile struct {
	__u8 fsverity_kfunc;	/* call bpf_get_fsverity_digest (no i_verity_info) */
	__u8 fsv_sig_hook;	/* inode_setintegrity is attached: fs-verity signatures are reported */
	__u8 dm_hook;		/* bdev_setintegrity is attached: dm-verity changes are reported */
} ipe_load = {};
#define IPE_USE_FSVERITY_KFUNC (ipe_load.fsverity_kfunc && !IPE_HAVE_INODE_VERITY)
#define IPE_FSV_SIG_HOOK ipe_load.fsv_sig_hook
#define IPE_DM_HOOK ipe_load.dm_hook
#else
#define IPE_USE_FSVERITY_KFUNC 0
#define IPE_FSV_SIG_HOOK 1	/* BCC runs on 6.12, which has inode_setintegrity */
#define IPE_DM_HOOK 1
#endif

#define S_VERITY (1 << 16)	/* include/linux/fs.h: inode->i_flags, stable since 5.4 */
#define FS_IOC_ENABLE_VERITY 0x40806685	/* _IOW('f', 133, struct fsverity_enable_arg) */

/* The one rule that names a digest and tests nothing else, kept in the digests map. */
struct ipe_inline_rule {
	__u32 index;		/* IPE_NO_RULE: the digest's rules are in the rules map */
	__u8 op;
	__u8 action;
};

/* What the decision needs to know about the file behind the event. */
struct ipe_attrs {
	__u32 roothash_id;	/* id of the file's dm-verity root hash in the slot, or 0 */
	__u32 digest_id;	/* id of the file's fs-verity digest in the slot, or 0 */
	struct ipe_inline_rule roothash_rule;	/* of the root hash, when it has one */
	struct ipe_inline_rule digest_rule;	/* of the fs-verity digest, when it has one */
	__u8 bools;		/* IPE_BOOL_* the file has */
	__u8 unknown;		/* IPE_BOOL_* the kernel keeps but the program has no record of for this file */
	__u8 walked;		/* its dm-verity state was read from the live table, not the hook */
};

struct ipe_decision {
	__u32 index;
	__u8 action;
	__u8 source;
};

#define IPE_READ(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), (src))

/*
 * Copy a kernel byte string of length len (<= IPE_DIGEST_MAX) into a digest buffer whose other
 * bytes become zero (keys compare whole arrays).  No loop over len: an unrolled per-byte test
 * forks the verifier's state once per byte, which 6.1 cannot prune.
 */
static __always_inline void ipe_read_digest(__u8 *dst, const void *src, __u32 len)
{
	__builtin_memset(dst, 0, IPE_DIGEST_MAX);
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
static __always_inline int ipe_sb_is_rootfs(void *sb)
{
	char name[8] = {};
	void *type = NULL;
	const char *type_name = NULL;

	if (!sb)
		return 0;
	IPE_FIELD(type, sb, struct super_block, s_type);
	if (!type)
		return 0;
	IPE_FIELD(type_name, type, struct file_system_type, name);
	bpf_probe_read_kernel_str(name, sizeof(name), type_name);
	return name[0] == 'r' && name[1] == 'o' && name[2] == 'o' && name[3] == 't' &&
	       name[4] == 'f' && name[5] == 's' && name[6] == 0;
}

/*
 * The id of the digest in key->slot's digests table; 0 if it has none (or the slot is empty).
 * `rule` gets the one rule that names it, if the table holds that rule.
 */
static __always_inline __u32 ipe_digest_id(struct ipe_digest_key *key, struct ipe_inline_rule *rule)
{
	__u32 slot = key->slot;
	void *table = ipe_map_lookup(ipe_digests, &slot);
	struct ipe_digest_value *v;

	rule->index = IPE_NO_RULE;
	if (!table)
		return 0;
	v = bpf_map_lookup_elem(table, key);
	if (!v)
		return 0;
	rule->index = v->index;
	rule->op = v->op;
	rule->action = v->action;
	return v->id;
}

/*
 * The inode whose properties count (IPE: d_real_inode()).  For overlayfs that is the upper
 * inode once copied up, else the lowest layer's; overlayfs' private layout is relocated at
 * load time (IPE_HAVE_OVL since 6.5, IPE_HAVE_OVL61 before).  The result may not be a BTF
 * pointer, so the attribute readers below read through bpf_probe_read_kernel throughout.
 */
static __always_inline void *ipe_real_inode(void *inode)
{
	void *sb = NULL, *oi, *dentry = NULL, *oe = NULL, *real = NULL;
	unsigned long magic = 0;
	unsigned int n = 0;

	if (!IPE_HAVE_OVL && !IPE_HAVE_OVL61)
		return inode;
	IPE_FIELD(sb, inode, struct inode, i_sb);
	if (!sb)
		return inode;
	IPE_FIELD(magic, sb, struct super_block, s_magic);
	if (magic != OVERLAYFS_SUPER_MAGIC)
		return inode;
	oi = inode - IPE_OFF_OVL_INODE_VFS_INODE;
	IPE_READ(dentry, oi + IPE_OFF_OVL_INODE_UPPER);
	if (!dentry && IPE_HAVE_OVL) {
		IPE_READ(oe, oi + IPE_OFF_OVL_INODE_OE);
		if (!oe)
			return inode;
		IPE_READ(n, oe + IPE_OFF_OVL_ENTRY_NUMLOWER);
		if (n == 0 || n > 512)
			return inode;
		IPE_READ(dentry, oe + IPE_OFF_OVL_ENTRY_LOWERSTACK + (n - 1) * IPE_SIZEOF_OVL_PATH +
				 IPE_OFF_OVL_PATH_DENTRY);
	} else if (!dentry) {
		IPE_READ(dentry, oi + IPE_OFF_OVL_INODE_LOWERPATH + IPE_OFF_OVL_PATH_DENTRY);
	}
	if (!dentry)
		return inode;
	IPE_FIELD(real, dentry, struct dentry, d_inode);
	return real ? real : inode;
}

/*
 * A device-mapper device's live table, when it is one dm-verity target: its root hash and
 * algorithm into key, and whether its root hash signature verified into *signed_: dm-verity
 * keeps the signature only then (6.12+: root_digest_sig).  Older dm-verity keeps no such
 * state: -1 (unknown) if the bdev_setintegrity hook could have told but did not see this
 * device, else 0: a kernel with neither keeps no signature state at all (6.1), and IPE then
 * evaluates every device as unsigned.  Covers devices set up before ipe-bpf was loaded and
 * kernels without the hook.  Returns 0 if bdev is not such a device, 1 if it is (key->len is 0
 * when its root hash cannot match a policy digest).
 */
static __always_inline int ipe_dm_table_roothash(void *bdev, struct ipe_digest_key *key, int *signed_)
{
	void *disk = NULL, *md = NULL, *table = NULL, *targets = NULL, *type = NULL, *v = NULL;
	const char *type_name = NULL, *alg = NULL;
	const __u8 *digest = NULL, *sig = NULL;
	char name[8] = {};
	unsigned int n = 0, len = 0;
	__u32 alg_len;

	if (!IPE_HAVE_DM_TABLE)
		return 0;
	IPE_FIELD(disk, bdev, struct block_device, bd_disk);
	if (!disk)
		return 0;
	bpf_probe_read_kernel(name, 4, disk + IPE_OFFSET(struct gendisk, disk_name));
	if (name[0] != 'd' || name[1] != 'm' || name[2] != '-')
		return 0;
	IPE_FIELD(md, disk, struct gendisk, private_data);
	if (!md)
		return 0;
	IPE_READ(table, md + IPE_OFF_MAPPED_DEVICE_MAP);
	if (!table)
		return 0;
	IPE_READ(n, table + IPE_OFF_DM_TABLE_NUM_TARGETS);
	IPE_READ(targets, table + IPE_OFF_DM_TABLE_TARGETS);
	if (n != 1 || !targets)
		return 0;
	IPE_READ(type, targets + IPE_OFF_DM_TARGET_TYPE);
	if (!type)
		return 0;
	IPE_READ(type_name, type + IPE_OFF_TARGET_TYPE_NAME);
	bpf_probe_read_kernel_str(name, sizeof(name), type_name);
	if (name[0] != 'v' || name[1] != 'e' || name[2] != 'r' || name[3] != 'i' ||
	    name[4] != 't' || name[5] != 'y' || name[6] != 0)
		return 0;
	IPE_READ(v, targets + IPE_OFF_DM_TARGET_PRIVATE);
	if (!v)
		return 0;
	if (IPE_HAVE_DM_SIG) {
		IPE_READ(sig, v + IPE_OFF_DM_VERITY_ROOT_DIGEST_SIG);
		*signed_ = sig ? 1 : 0;
	} else {
		*signed_ = IPE_DM_HOOK ? -1 : 0;
	}
	IPE_READ(alg, v + IPE_OFF_DM_VERITY_ALG_NAME);
	IPE_READ(digest, v + IPE_OFF_DM_VERITY_ROOT_DIGEST);
	IPE_READ(len, v + IPE_OFF_DM_VERITY_DIGEST_SIZE);
	if (!alg || !digest || len > IPE_DIGEST_MAX)
		return 1;
	alg_len = ipe_read_alg(key->alg, alg);
	if (alg_len > IPE_ALG_MAX)
		return 1;
	ipe_read_digest(key->value, digest, len);
	key->alg_len = alg_len;
	key->len = len;
	return 1;
}

/* A device the bdev_setintegrity hook captured: same results as ipe_dm_table_roothash. */
static __always_inline int ipe_dm_hooked_roothash(__u32 dev, struct ipe_digest_key *key, int *signed_)
{
	struct ipe_bdev_state *st = ipe_map_lookup(ipe_devices, &dev);

	if (!st)
		return 0;
	*signed_ = st->sig_valid;
	if (!st->has_roothash || st->alg_len > IPE_ALG_MAX || st->digest_len > IPE_DIGEST_MAX)
		return 1;
	key->alg_len = st->alg_len;
	key->len = st->digest_len;
	/* helper copies: inline ones spill through the stack, which is short */
	bpf_probe_read_kernel(key->alg, IPE_ALG_MAX, st->alg);
	bpf_probe_read_kernel(key->value, IPE_DIGEST_MAX, st->digest);
	return 1;
}

static __always_inline void ipe_dmverity_attrs(void *inode, int slot, struct ipe_attrs *a)
{
	void *sb = NULL, *bdev = NULL;
	struct ipe_digest_key key = {};
	int signed_ = 0;
	dev_t dev = 0;

	IPE_FIELD(sb, inode, struct inode, i_sb);
	if (!sb)
		return;
	IPE_FIELD(bdev, sb, struct super_block, s_bdev);
	if (!bdev)
		return;
	IPE_FIELD(dev, bdev, struct block_device, bd_dev);
	if (!ipe_dm_hooked_roothash(dev, &key, &signed_)) {
		if (!ipe_dm_table_roothash(bdev, &key, &signed_))
			return;
		a->walked = 1;
	}
	if (signed_ > 0)
		a->bools |= IPE_BOOL_DMV_SIGNATURE;
	else if (signed_ < 0)
		a->unknown |= IPE_BOOL_DMV_SIGNATURE;
	if (!key.len)
		return;
	key.slot = slot;
	key.kind = IPE_DIGEST_DMVERITY;
	a->roothash_id = ipe_digest_id(&key, &a->roothash_rule);
}

/* The fs-verity digest from the inode's verity info (6.1, 6.12); 0 if it has none. */
static __always_inline int ipe_fsverity_from_inode(void *inode, struct ipe_digest_key *key)
{
	void *vi = NULL, *alg = NULL;
	const char *alg_name = NULL;
	__u32 size = 0, alg_len;

	IPE_READ(vi, inode + IPE_OFF_INODE_VERITY);
	if (!vi)
		return 0;
	IPE_READ(alg, vi + IPE_OFF_FSVERITY_INFO_HASH_ALG);
	if (!alg)
		return 0;
	IPE_READ(size, alg + IPE_OFF_HASH_ALG_SIZE);
	IPE_READ(alg_name, alg + IPE_OFF_HASH_ALG_NAME);
	if (size > IPE_DIGEST_MAX || !alg_name)
		return 0;
	alg_len = ipe_read_alg(key->alg, alg_name);
	if (alg_len > IPE_ALG_MAX)
		return 0;
	ipe_read_digest(key->value, vi + IPE_OFF_FSVERITY_INFO_DIGEST, size);
	key->alg_len = alg_len;
	key->len = size;
	return 1;
}

#ifdef IPE_CORE
/* The fs-verity digest through the kfunc (7.x); 0 if the file has none. */
static __always_inline int ipe_fsverity_from_kfunc(struct file *file, struct ipe_digest_key *key)
{
	struct ipe_path_scratch *s = ipe_map_lookup(ipe_scratch, &(__u32){0});
	struct bpf_dynptr ptr;
	__u16 alg;

	if (!s)
		return 0;
	if (bpf_dynptr_from_mem(&s->fsv_alg, sizeof(*s) - offsetof(struct ipe_path_scratch, fsv_alg), 0, &ptr))
		return 0;
	if (bpf_get_fsverity_digest(file, &ptr) < 0)
		return 0;
	alg = s->fsv_alg;
	if (s->fsv_size > IPE_DIGEST_MAX)
		return 0;
	/* the algorithm's name as the inode's verity info spells it: "sha256" or "sha512" */
	if (alg != FS_VERITY_HASH_ALG_SHA256 && alg != FS_VERITY_HASH_ALG_SHA512)
		return 0;
	key->alg[0] = 's';
	key->alg[1] = 'h';
	key->alg[2] = 'a';
	key->alg[3] = '2' + 3 * (alg == FS_VERITY_HASH_ALG_SHA512);
	key->alg[4] = alg == FS_VERITY_HASH_ALG_SHA512 ? '1' : '5';
	key->alg[5] = alg == FS_VERITY_HASH_ALG_SHA512 ? '2' : '6';
	key->alg_len = 6;
	ipe_read_digest(key->value, s->fsv_digest, s->fsv_size);
	key->len = s->fsv_size;
	return 1;
}
#endif

/*
 * fsverity_digest and fsverity_signature.  btf_file / btf_inode are the event's own file and
 * inode as the hook got them (NULL when the properties come from another inode: overlayfs),
 * which the kfunc and inode storage need.  A kernel without the inode_setintegrity hook keeps
 * no record of a verified signature: FALSE, as IPE evaluates a file it has none for.  With the
 * hook, the signature is known for files whose verity set-up the program watched
 * (ipe_inode_state); for others it is unknown, never FALSE.
 */
static __always_inline void ipe_fsverity_attrs(void *inode, struct inode *btf_inode, struct file *btf_file,
					       int slot, struct ipe_attrs *a)
{
	struct ipe_inode_state *ist;
	struct ipe_digest_key key = {};
	int verity = 0;

	if (IPE_HAVE_INODE_VERITY)
		verity = ipe_fsverity_from_inode(inode, &key);
#ifdef IPE_CORE
	else if (IPE_USE_FSVERITY_KFUNC && btf_file)
		verity = ipe_fsverity_from_kfunc(btf_file, &key);
#endif
	if (!verity)
		return;
	if (IPE_FSV_SIG_HOOK) {
		ist = btf_inode ? ipe_inode_storage(ipe_inodes, btf_inode, 0) : NULL;
		if (ist && ist->fsv_sig_valid)
			a->bools |= IPE_BOOL_FSV_SIGNATURE;
		else if (!ist || !ist->fsv_observed)
			a->unknown |= IPE_BOOL_FSV_SIGNATURE;	/* checked before load, or through overlayfs */
	}
	key.slot = slot;
	key.kind = IPE_DIGEST_FSVERITY;
	a->digest_id = ipe_digest_id(&key, &a->digest_rule);
}

/* Per-file context (IPE): inode = d_real_inode(), sb = the mount's superblock. */
static __always_inline void ipe_file_attrs(struct file *file, int slot, struct ipe_attrs *a)
{
	struct inode *inode = file->f_inode;
	struct vfsmount *mnt = file->f_path.mnt;
	void *real, *msb = NULL;

	if (mnt) {
		IPE_FIELD(msb, mnt, struct vfsmount, mnt_sb);
		if (ipe_sb_is_rootfs(msb))
			a->bools |= IPE_BOOL_BOOT_VERIFIED;
	}
	if (!inode)
		return;
	real = ipe_real_inode(inode);
	ipe_dmverity_attrs(real, slot, a);
	if (real == (void *)inode)
		ipe_fsverity_attrs(real, inode, file, slot, a);
	else
		ipe_fsverity_attrs(real, NULL, NULL, slot, a);
}

static __always_inline void ipe_rule_try(struct ipe_rule_key *k, __u8 shape, struct ipe_attrs *a,
					 struct ipe_decision *d)
{
	struct ipe_rule_value *v;
	__u32 slot = k->slot;
	void *table = ipe_map_lookup(ipe_rules, &slot);

	if (!table)
		return;
	k->shape = shape;
	k->roothash_id = (shape & IPE_SHAPE_ROOTHASH) ? a->roothash_id : 0;
	k->digest_id = (shape & IPE_SHAPE_FSVERITY) ? a->digest_id : 0;
	v = bpf_map_lookup_elem(table, k);
	if (v && v->index < d->index) {
		d->index = v->index;
		d->action = v->action;
		d->source = IPE_SOURCE_RULE;
	}
}

/* A single-property rule kept with its digest: it matches every file with the digest. */
static __always_inline void ipe_inline_try(struct ipe_inline_rule *r, __u8 op, struct ipe_decision *d)
{
	if (r->op == op && r->index < d->index) {
		d->index = r->index;
		d->action = r->action;
		d->source = IPE_SOURCE_RULE;
	}
}

/* First matching rule (lowest index over the shapes), else op default, else global default. */
static __always_inline void ipe_decide(struct ipe_policy_defaults *def, int slot, __u8 op,
				       struct ipe_attrs *a, __u8 bools, struct ipe_decision *d)
{
	struct ipe_rule_key k = {};
	__u8 shapes = def->shapes;

	d->index = IPE_NO_RULE;
	d->action = IPE_ACTION_ALLOW;
	d->source = IPE_SOURCE_NONE;
	if (op < IPE_OP_UNKNOWN) {
		k.slot = slot;
		k.op = op;
		k.bools = bools;
		if (shapes & (1 << 0))
			ipe_rule_try(&k, 0, a, d);
		if (a->roothash_id && a->roothash_rule.index != IPE_NO_RULE)
			ipe_inline_try(&a->roothash_rule, op, d);
		else if ((shapes & (1 << IPE_SHAPE_ROOTHASH)) && a->roothash_id)
			ipe_rule_try(&k, IPE_SHAPE_ROOTHASH, a, d);
		if (a->digest_id && a->digest_rule.index != IPE_NO_RULE)
			ipe_inline_try(&a->digest_rule, op, d);
		else if ((shapes & (1 << IPE_SHAPE_FSVERITY)) && a->digest_id)
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

/*
 * The decision when some boolean properties are unknown (the kernel keeps them, but not for
 * this file in the program's view): the policy is asked with every value they could have.  If
 * the answers agree, that is the decision; if not, it hangs on what the program cannot tell,
 * and the event is denied (fail-closed) with the denying rule.  Returns 1 in that case.
 */
static __always_inline int ipe_decide_all(struct ipe_policy_defaults *def, int slot, __u8 op,
					  struct ipe_attrs *a, struct ipe_decision *d)
{
	struct ipe_decision alt = {};
	__u8 unknown = a->unknown & def->bool_mask;	/* what no rule tests cannot matter */
	__u8 known = a->bools & ~unknown & def->bool_mask;
	int split = 0;

	ipe_decide(def, slot, op, a, known, d);
	if (!unknown)
		return 0;
#pragma unroll
	for (__u8 extra = IPE_BOOL_DMV_SIGNATURE; extra <= (IPE_BOOL_DMV_SIGNATURE | IPE_BOOL_FSV_SIGNATURE);
	     extra += IPE_BOOL_DMV_SIGNATURE) {
		if (extra & ~unknown)
			continue;
		ipe_decide(def, slot, op, a, known | extra, &alt);
		if (alt.action == d->action)
			continue;
		split = 1;
		if (alt.action == IPE_ACTION_DENY)
			*d = alt;
	}
	return split;
}

/* d_path() rebuilt for file_mprotect (see ipe_walk_into): the walk's state between steps. */
struct ipe_walk {
	struct ipe_path_scratch *s;
	void *dentry;
	void *vfsmnt;
	__u32 pos;		/* the path so far is s->buf[pos .. IPE_PATH_MAX) */
	__u8 done;		/* reached the root */
	__u8 failed;		/* too long, or unreadable */
};

/* One step up: cross to the parent mount at a mount's root, else prepend one name. */
static __always_inline int ipe_walk_step(struct ipe_walk *w)
{
	void *root = NULL, *mnt, *parent = NULL, *up = NULL;
	const unsigned char *name = NULL;
	__u32 len = 0, pos = w->pos;

	IPE_FIELD(root, w->vfsmnt, struct vfsmount, mnt_root);
	if (w->dentry == root) {
		mnt = w->vfsmnt - IPE_OFF_MOUNT_MNT;
		IPE_READ(parent, mnt + IPE_OFF_MOUNT_PARENT);
		if (!parent || parent == mnt) {
			w->done = 1;
			return 1;
		}
		IPE_READ(w->dentry, mnt + IPE_OFF_MOUNT_MOUNTPOINT);
		w->vfsmnt = parent + IPE_OFF_MOUNT_MNT;
		return 0;
	}
	IPE_FIELD(up, w->dentry, struct dentry, d_parent);
	if (!up || up == w->dentry) {
		w->done = 1;
		return 1;
	}
	IPE_FIELD(len, w->dentry, struct dentry, d_name.len);
	IPE_FIELD(name, w->dentry, struct dentry, d_name.name);
	if (len + 1 > pos || len > 0xff) {
		w->failed = 1;
		return 1;
	}
	IPE_CORE_BARRIER(len);
	len &= 0xff;
	pos -= len;
	bpf_probe_read_kernel(&w->s->buf[pos & (IPE_PATH_MAX - 1)], len, name);
	pos -= 1;
	w->s->buf[pos & (IPE_PATH_MAX - 1)] = '/';
	w->pos = pos;
	w->dentry = up;
	return 0;
}

#ifdef IPE_CORE
static long ipe_walk_loop(__u32 i, void *ctx)
{
	return ipe_walk_step(ctx);
}
#endif

/*
 * d_path() rebuilt by walking d_parent up to the root, crossing mounts through struct mount
 * (relocated: a private struct), where bpf_d_path() is refused (file_mprotect) or cannot be
 * used (the task's executable: not a trusted pointer).  Relative to the initial namespace's
 * root, without d_path's " (deleted)" suffix.  Any depth: a path of IPE_PATH_MAX - 1 bytes has
 * at most IPE_PATH_MAX / 2 components, and at most as many mount crossings, so IPE_PATH_MAX
 * steps reach the root of any path that fits.  Writes the path into dst (max bytes, a power
 * of two, with its NUL) and returns its length, or 0 (too long: the caller records the name).
 */
static __always_inline __u32 ipe_walk_into(char *dst, __u32 max, void *dentry, void *vfsmnt)
{
	struct ipe_walk w = {};
	__u32 len;

	if (!IPE_HAVE_MOUNT)
		return 0;
	w.s = ipe_map_lookup(ipe_scratch, &(__u32){0});
	w.dentry = dentry;
	w.vfsmnt = vfsmnt;
	w.pos = IPE_PATH_MAX;
	if (!w.s || !w.dentry || !w.vfsmnt)
		return 0;
#ifdef IPE_CORE
	bpf_loop(IPE_PATH_MAX, ipe_walk_loop, &w, 0);
#else
	/*
	 * BCC cannot link a bpf_loop callback, and an unrolled walk next to the decision is more
	 * than the verifier explores (E2BIG on 6.12): BCC builds record the name only.
	 */
	return 0;
#endif
	if (!w.done || w.failed)
		return 0;
	if (w.pos == IPE_PATH_MAX) {	/* the root itself */
		dst[0] = '/';
		dst[1] = 0;
		return 1;
	}
	len = IPE_PATH_MAX - w.pos;
	if (len >= max)
		return 0;
	/* keep the mask: clang would drop it after the check, and the verifier needs it */
	IPE_CORE_BARRIER(len);
	len &= max - 1;
	bpf_probe_read_kernel(dst, len, &w.s->buf[w.pos & (IPE_PATH_MAX - 1)]);
	dst[len & (max - 1)] = 0;
	return len;
}

/* A file's path into dst (max bytes): full when it can be had, else its name. */
static __always_inline __u8 ipe_file_path(char *dst, __u32 max, __u16 *out_len, void *file, int use_d_path)
{
	void *dentry = NULL, *mnt = NULL;
	const unsigned char *name = NULL;
	long n = -1;

	dst[0] = 0;
	*out_len = 0;
	if (use_d_path) {
		n = bpf_d_path(&((struct file *)file)->f_path, dst, max);
		if (n > 0) {
			*out_len = n - 1;
			return IPE_PATH_FULL;
		}
	} else {
		IPE_FIELD(dentry, file, struct file, f_path.dentry);
		IPE_FIELD(mnt, file, struct file, f_path.mnt);
		n = ipe_walk_into(dst, max, dentry, mnt);
		if (n > 0) {
			*out_len = n;
			return IPE_PATH_FULL;
		}
	}
	IPE_FIELD(dentry, file, struct file, f_path.dentry);
	if (dentry) {
		IPE_FIELD(name, dentry, struct dentry, d_name.name);
		n = bpf_probe_read_kernel_str(dst, max, name);
		if (n > 0)
			*out_len = n - 1;
	}
	return IPE_PATH_NAME;
}

/* The subject, as the kernel's SYSCALL record gives it: uid, auid, ses, exe. */
static __always_inline void ipe_fill_subject(struct ipe_event *e)
{
	void *task = (void *)bpf_get_current_task();
	void *mm = NULL, *exe = NULL;
	__u32 auid = IPE_ID_UNSET, ses = IPE_ID_UNSET;

	e->uid = bpf_get_current_uid_gid() & 0xffffffff;
	if (IPE_HAVE_LOGINUID) {
		IPE_FIELD(auid, task, struct task_struct, loginuid.val);
		IPE_FIELD(ses, task, struct task_struct, sessionid);
	}
	e->auid = auid;
	e->ses = ses;
	IPE_FIELD(mm, task, struct task_struct, mm);
	if (mm)
		IPE_FIELD(exe, mm, struct mm_struct, exe_file);
	if (!exe) {
		e->exe_kind = IPE_PATH_NONE;	/* a kernel thread */
		e->exe_len = 0;
		e->exe[0] = 0;
		return;
	}
	e->exe_kind = ipe_file_path(e->exe, IPE_EXE_MAX, &e->exe_len, exe, 0);
}

static __always_inline void ipe_audit(struct file *file, __u8 op, __u8 hook, __u8 enforcing,
				      struct ipe_decision *d, __u64 generation, int use_d_path,
				      struct ipe_counters *c)
{
	struct ipe_event *e = ipe_ringbuf_reserve(ipe_events, sizeof(struct ipe_event));
	struct inode *inode;
	void *sb = NULL;

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
	e->kind = IPE_KIND_DECISION;
	e->ino = 0;
	e->dev[0] = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	ipe_fill_subject(e);
	if (!file) {
		e->path_kind = IPE_PATH_NONE;
		e->path_len = 0;
		e->path[0] = 0;
	} else {
		e->path_kind = ipe_file_path(e->path, IPE_PATH_MAX, &e->path_len, file, use_d_path);
		inode = file->f_inode;
		if (inode) {
			IPE_FIELD(e->ino, inode, struct inode, i_ino);
			IPE_FIELD(sb, inode, struct inode, i_sb);
			if (sb)
				bpf_probe_read_kernel_str(e->dev, IPE_SID_LEN,
							  sb + IPE_OFFSET(struct super_block, s_id));
		}
	}
	ipe_ringbuf_submit(e);
}

#if IPE_HAVE_CACHE
/*
 * The decision cache (op EXECUTE).  A cached decision is valid while the slot's epoch (a new
 * one per policy install), the file's verity bit (fs-verity can be turned on later) and the
 * count of dm-verity device changes are unchanged.  Not cached: overlayfs files (a copy-up
 * changes the real inode) and files whose dm-verity state came from a live table on a kernel
 * that does not report table changes (no bdev_setintegrity).
 */
static __always_inline int ipe_cacheable(struct inode *inode)
{
	return inode && inode->i_sb && inode->i_sb->s_magic != OVERLAYFS_SUPER_MAGIC;
}

static __always_inline __u32 ipe_dev_change_count(void)
{
	__u64 *n = bpf_map_lookup_elem(&ipe_dev_changes, &(__u32){0});

	return n ? (__u32)*n : 0;
}

static __always_inline int ipe_cache_get(struct inode *inode, __u64 epoch, struct ipe_decision *d, int *split)
{
	struct ipe_cached *c;

	if (!ipe_cacheable(inode))
		return 0;
	c = bpf_inode_storage_get(&ipe_cache, inode, 0, 0);
	if (!c || c->epoch != epoch || c->dev_changes != ipe_dev_change_count() ||
	    c->verity != !!(inode->i_flags & S_VERITY))
		return 0;
	d->index = c->index;
	d->action = c->action;
	d->source = c->source;
	*split = c->split;
	return 1;
}

/* A new entry replaces the old one whole (see struct ipe_cached); if another CPU created one
 * between the two steps, that one stays: it is whole too. */
static __always_inline void ipe_cache_put(struct inode *inode, __u64 epoch, __u32 dev_changes,
					  struct ipe_attrs *a, struct ipe_decision *d, int split)
{
	struct ipe_cached v = {};

	if (!ipe_cacheable(inode) || (a->walked && !IPE_DM_HOOK))
		return;
	v.epoch = epoch;
	v.dev_changes = dev_changes;
	v.index = d->index;
	v.action = d->action;
	v.source = d->source;
	v.split = split;
	v.verity = !!(inode->i_flags & S_VERITY);
	bpf_inode_storage_delete(&ipe_cache, inode);
	bpf_inode_storage_get(&ipe_cache, inode, &v, BPF_LOCAL_STORAGE_GET_F_CREATE);
}

static __always_inline void ipe_note_dev_change(void)
{
	__u64 *n = bpf_map_lookup_elem(&ipe_dev_changes, &(__u32){0});

	if (n)
		__sync_fetch_and_add(n, 1);
}
#else
#define ipe_note_dev_change() do { } while (0)
#endif

/* The whole evaluation of one event; returns the hook's return value. */
static __always_inline int ipe_evaluate(struct file *file, __u8 op, __u8 hook, int use_d_path)
{
	__u32 zero = 0;
	struct ipe_config *cfg = ipe_map_lookup(ipe_config, &zero);
	struct ipe_policy_defaults *def;
	struct ipe_counters *c;
	struct ipe_attrs a = {};
	struct ipe_decision d = {};
	__u8 active, enforcing;
	__u32 slot, dev_changes = 0;
	int split = 0;

	if (!cfg)
		return 0;
	active = *(volatile __u8 *)&cfg->active;
	if (active == IPE_ACTIVE_NONE || active > IPE_SLOTS)
		return 0;
	slot = active - 1;
	def = ipe_map_lookup(ipe_defaults, &slot);
	if (!def)
		return 0;
#if IPE_HAVE_CACHE
	if (file && op == IPE_OP_EXECUTE && ipe_cache_get(file->f_inode, def->epoch, &d, &split))
		goto decided;
	/* the count before the attributes are read: a change meanwhile leaves a stale tag */
	dev_changes = ipe_dev_change_count();
#endif
	if (file)
		ipe_file_attrs(file, slot, &a);
	split = ipe_decide_all(def, slot, op, &a, &d);
#if IPE_HAVE_CACHE
	if (file && op == IPE_OP_EXECUTE)
		ipe_cache_put(file->f_inode, def->epoch, dev_changes, &a, &d, split);
decided:
#endif
	enforcing = !cfg->permissive;

	c = ipe_map_lookup(ipe_counters, &zero);
	if (c) {
		if (split)
			c->undecidable++;
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

/*
 * kernel_read_file / kernel_load_data ids -> op.  The ids' values come from the running
 * kernel (IPE_ENUM relocates them: a kernel may renumber or add ids, as 7.x added the
 * compressed-module ids, which are module loads: KMODULE).
 */
static __always_inline __u8 ipe_read_id_op(int id)
{
	if (id == IPE_ENUM(enum kernel_read_file_id, READING_FIRMWARE))
		return IPE_OP_FIRMWARE;
	if (id == IPE_ENUM(enum kernel_read_file_id, READING_MODULE))
		return IPE_OP_KMODULE;
	if (IPE_HAVE_READING_MODULE_COMPRESSED && id == IPE_READING_MODULE_COMPRESSED)
		return IPE_OP_KMODULE;
	if (id == IPE_ENUM(enum kernel_read_file_id, READING_KEXEC_IMAGE))
		return IPE_OP_KEXEC_IMAGE;
	if (id == IPE_ENUM(enum kernel_read_file_id, READING_KEXEC_INITRAMFS))
		return IPE_OP_KEXEC_INITRAMFS;
	if (id == IPE_ENUM(enum kernel_read_file_id, READING_POLICY))
		return IPE_OP_POLICY;
	if (id == IPE_ENUM(enum kernel_read_file_id, READING_X509_CERTIFICATE))
		return IPE_OP_X509_CERT;
	return IPE_OP_UNKNOWN;
}

static __always_inline __u8 ipe_load_id_op(int id)
{
	if (id == IPE_ENUM(enum kernel_load_data_id, LOADING_FIRMWARE))
		return IPE_OP_FIRMWARE;
	if (id == IPE_ENUM(enum kernel_load_data_id, LOADING_MODULE))
		return IPE_OP_KMODULE;
	if (IPE_HAVE_LOADING_MODULE_COMPRESSED && id == IPE_LOADING_MODULE_COMPRESSED)
		return IPE_OP_KMODULE;
	if (id == IPE_ENUM(enum kernel_load_data_id, LOADING_KEXEC_IMAGE))
		return IPE_OP_KEXEC_IMAGE;
	if (id == IPE_ENUM(enum kernel_load_data_id, LOADING_KEXEC_INITRAMFS))
		return IPE_OP_KEXEC_INITRAMFS;
	if (id == IPE_ENUM(enum kernel_load_data_id, LOADING_POLICY))
		return IPE_OP_POLICY;
	if (id == IPE_ENUM(enum kernel_load_data_id, LOADING_X509_CERTIFICATE))
		return IPE_OP_X509_CERT;
	return IPE_OP_UNKNOWN;
}

/* ---------------------------------------------------------------- decision hooks */

/*
 * The verifier cannot give a BPF LSM program a `const void *` argument (the BTF walk stops at
 * the const modifier: "arg2 type UNKNOWN is not a struct"), and treats trusted pointer
 * arguments as non-NULL; such arguments are read from the context with bpf_probe_read_kernel.
 */
static __always_inline const void *ipe_ctx_ptr(unsigned long long *ctx, int i)
{
	const void *p = NULL;

	bpf_probe_read_kernel(&p, sizeof(p), &ctx[i]);
	return p;
}

/*
 * Whether a file argument that may be NULL (mmap_file, kernel_read_file) is.  6.12's verifier
 * treats a trusted hook argument as never NULL: it drops `if (!file)` as dead code, and the
 * NULL case would run unguarded loads (a NULL dereference in the kernel).  A pointer compared
 * with a constant other than 0 is a test it cannot decide, so it checks both ways (no kernel
 * object lives in the first page).  Cheaper than laundering a copy through
 * bpf_probe_read_kernel (about 90 instructions on every PROT_EXEC mmap).
 */
static __always_inline int ipe_no_file(const void *file)
{
	return (unsigned long)file < 4096;
}

IPE_HOOK(bprm_check_security, struct linux_binprm *bprm)
{
	return ipe_evaluate(bprm->file, IPE_OP_EXECUTE, IPE_HOOK_BPRM_CHECK, 1);
}

IPE_HOOK(mmap_file, struct file *file, unsigned long reqprot, unsigned long prot, unsigned long flags)
{
	if (!(prot & PROT_EXEC))
		return 0;
	if (ipe_no_file(file))	/* anonymous memory */
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
	if (ipe_no_file(file))
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
	const char *alg = NULL;
	const __u8 *digest = NULL;
	__u32 dev = bdev->bd_dev;
	__u32 alg_len;
	__u64 len = 0;

	if (type != IPE_ENUM(enum lsm_integrity_type, LSM_INT_DMVERITY_SIG_VALID) &&
	    type != IPE_ENUM(enum lsm_integrity_type, LSM_INT_DMVERITY_ROOTHASH))
		return 0;
	old = ipe_map_lookup(ipe_devices, &dev);
	if (old)
		__builtin_memcpy(&st, old, sizeof(st));
	if (type == IPE_ENUM(enum lsm_integrity_type, LSM_INT_DMVERITY_SIG_VALID)) {
		st.sig_valid = value && size ? 1 : 0;
	} else if (!value) {
		st.has_roothash = 0;
		st.alg_len = 0;
		st.digest_len = 0;
		__builtin_memset(st.alg, 0, sizeof(st.alg));
		__builtin_memset(st.digest, 0, sizeof(st.digest));
	} else {
		IPE_FIELD(alg, value, struct dm_verity_digest, alg);
		IPE_FIELD(digest, value, struct dm_verity_digest, digest);
		IPE_FIELD(len, value, struct dm_verity_digest, digest_len);
		__builtin_memset(st.alg, 0, sizeof(st.alg));
		__builtin_memset(st.digest, 0, sizeof(st.digest));
		alg_len = alg ? ipe_read_alg(st.alg, alg) : IPE_ALG_MAX + 1;
		st.has_roothash = 1;
		st.alg_len = alg_len > 255 ? 255 : alg_len;
		if (len > IPE_DIGEST_MAX || !digest) {
			st.digest_len = 255;	/* can never match */
		} else {
			ipe_read_digest(st.digest, digest, len);
			st.digest_len = len;
		}
	}
	ipe_map_update(ipe_devices, &dev, &st);
	ipe_note_dev_change();
	return 0;
}

IPE_HOOK(bdev_free_security, struct block_device *bdev)
{
	__u32 dev = bdev->bd_dev;

	ipe_map_delete(ipe_devices, &dev);
	ipe_note_dev_change();
	return 0;
}

IPE_HOOK(inode_setintegrity, const struct inode *inode, enum lsm_integrity_type type)
{
	const void *value = ipe_ctx_ptr(ctx, 2);
	size_t size = ctx[3];
	struct ipe_inode_state *st;

	if (type != IPE_ENUM(enum lsm_integrity_type, LSM_INT_FSVERITY_BUILTINSIG_VALID))
		return 0;
	st = ipe_inode_storage(ipe_inodes, inode, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (st) {
		st->fsv_sig_valid = value && size ? 1 : 0;
		st->fsv_observed = 1;
	}
	return 0;
}

/*
 * Which fs-verity files' signature checks happen while the program is loaded: fs-verity sets a
 * file's verity info up (and reports a verified built-in signature through inode_setintegrity)
 * on its first open, after file_open has run, or when FS_IOC_ENABLE_VERITY turns verity on.
 * Marking the inode here makes "no signature reported" mean FALSE for it.
 */
static __always_inline int ipe_verity_set_up(void *inode, struct file *file)
{
	void *vi = NULL;

	if (IPE_HAVE_INODE_VERITY) {
		IPE_READ(vi, inode + IPE_OFF_INODE_VERITY);
		return vi != NULL;
	}
#ifdef IPE_CORE
	if (IPE_USE_FSVERITY_KFUNC) {
		/* the kfunc copies the whole digest (7.x: ~0.5 us of each exec): ask once per inode;
		 * verity info, once set up, stays until the inode (and this storage) is evicted */
		struct ipe_inode_state *st = ipe_inode_storage(ipe_inodes, inode, 0);
		struct ipe_digest_key key = {};

		if (st && (st->fsv_set_up || st->fsv_observed))
			return 1;
		if (!ipe_fsverity_from_kfunc(file, &key))
			return 0;
		st = ipe_inode_storage(ipe_inodes, inode, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (st)
			st->fsv_set_up = 1;
		return 1;
	}
#endif
	return 1;	/* no way to tell: leave it unknown */
}

IPE_HOOK(file_open, struct file *file)
{
	struct inode *inode = file->f_inode;
	struct ipe_inode_state *st;

	/* i_flags read directly, not through bpf_probe_read_kernel: this runs on every open */
	if (!IPE_FSV_SIG_HOOK || !inode || !(inode->i_flags & S_VERITY) || ipe_verity_set_up(inode, file))
		return 0;
	st = ipe_inode_storage(ipe_inodes, inode, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (st)
		st->fsv_observed = 1;
	return 0;
}

IPE_HOOK(file_ioctl, struct file *file, unsigned int cmd, unsigned long arg)
{
	struct inode *inode = file->f_inode;
	struct ipe_inode_state *st;

	if (!IPE_FSV_SIG_HOOK || cmd != FS_IOC_ENABLE_VERITY || !inode)
		return 0;
	st = ipe_inode_storage(ipe_inodes, inode, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (st)
		st->fsv_observed = 1;
	return 0;
}

/* ---------------------------------------------------------------- the seal (docs/seal.md) */

#ifdef IPE_CORE
/*
 * CO-RE only: the BCC loader is the development loader and is never sealed (`ipe-bpf seal`
 * refuses it); these hooks also walk private structs (struct mount, the fd table) for which
 * the BCC build would need more -D offsets.
 *
 * Until the control plane sets ipe_seal.sealed, every hook below returns at its first map
 * lookup.  Once sealed (until reboot), each refuses what could change what the decision hooks
 * enforce, with EPERM and a ring-buffer record (IPE_KIND_SEAL) naming the attempt:
 *  - bpf(): writing, deleting or freezing an element of a map of ours (the maps are also
 *    frozen, so the kernel refuses those writes anyway), detaching or updating a link of ours;
 *  - new programs that could override decisions or write our maps (ipe_prog_refusal);
 *  - unlink / rmdir / rename in the pin folders, unmounting the bpffs or a mount above the
 *    pins, mounting on the pins' path or moving a mount of it.
 */
#define EPERM 1
#define MS_REMOUNT 32
#define MS_PROPAGATION ((1 << 17) | (1 << 18) | (1 << 19) | (1 << 20))	/* UNBINDABLE PRIVATE SLAVE SHARED */
#define IPE_MAX_USED_MAPS 64	/* MAX_USED_MAPS */

static __always_inline struct ipe_seal *ipe_sealed(void)
{
	__u32 zero = 0;
	struct ipe_seal *s = ipe_map_lookup(ipe_seal, &zero);

	return s && s->sealed ? s : NULL;
}

static __always_inline int ipe_seal_map_index(struct ipe_seal *s, __u32 id)
{
	for (int i = 0; i < IPE_SEAL_MAPS; i++)
		if (i < s->nr_maps && s->map_id[i] == id)
			return i;
	return -1;
}

static __always_inline int ipe_seal_has_prog(struct ipe_seal *s, __u32 id)
{
	for (int i = 0; i < IPE_SEAL_PROGS; i++)
		if (i < s->nr_progs && s->prog_id[i] == id)
			return 1;
	return 0;
}

static __always_inline int ipe_seal_has_link(struct ipe_seal *s, __u32 id)
{
	for (int i = 0; i < IPE_SEAL_PROGS; i++)
		if (i < s->nr_links && s->link_id[i] == id)
			return 1;
	return 0;
}

/* One of the pin folders (by superblock and inode number). */
static __always_inline int ipe_seal_is_dir(struct ipe_seal *s, void *inode)
{
	void *sb = NULL;
	__u32 dev = 0;
	__u64 ino = 0;

	if (!inode)
		return 0;
	IPE_FIELD(sb, inode, struct inode, i_sb);
	if (!sb)
		return 0;
	IPE_FIELD(dev, sb, struct super_block, s_dev);
	if (dev != s->bpffs_dev)
		return 0;
	IPE_FIELD(ino, inode, struct inode, i_ino);
	for (int i = 0; i < IPE_SEAL_DIRS; i++)
		if (i < s->nr_dirs && s->dir_dev[i] == dev && s->dir_ino[i] == ino)
			return 1;
	return 0;
}

static __always_inline __u32 ipe_mount_id(void *vfsmount)
{
	__u32 id = 0;

	IPE_FIELD(id, vfsmount - IPE_OFF_MOUNT_MNT, struct mount, mnt_id);
	return id;
}

/* A mount on the way from / to the pins (or one of the bpffs holding them). */
static __always_inline int ipe_seal_is_mount(struct ipe_seal *s, void *vfsmount)
{
	void *sb = NULL;
	__u32 id = ipe_mount_id(vfsmount), dev = 0;

	IPE_FIELD(sb, vfsmount, struct vfsmount, mnt_sb);
	if (sb)
		IPE_FIELD(dev, sb, struct super_block, s_dev);
	if (dev == s->bpffs_dev)
		return 1;
	for (int i = 0; i < IPE_SEAL_POINTS; i++)
		if (i < s->nr_points && s->point_mnt[i] == id)
			return 1;
	return 0;
}

/* A path on the way from / to the pins: (mount, inode) of one of its directories. */
static __always_inline int ipe_seal_is_point(struct ipe_seal *s, const void *path)
{
	void *mnt = NULL, *dentry = NULL, *inode = NULL;
	__u32 id;
	__u64 ino = 0;

	if (!path)
		return 0;
	IPE_FIELD(mnt, path, struct path, mnt);
	IPE_FIELD(dentry, path, struct path, dentry);
	if (!mnt || !dentry)
		return 0;
	IPE_FIELD(inode, dentry, struct dentry, d_inode);
	if (!inode)
		return 0;
	IPE_FIELD(ino, inode, struct inode, i_ino);
	id = ipe_mount_id(mnt);
	for (int i = 0; i < IPE_SEAL_POINTS; i++)
		if (i < s->nr_points && s->point_mnt[i] == id && s->point_ino[i] == ino)
			return 1;
	return 0;
}

/* Count, audit (an IPE_KIND_SEAL record: attempt, detail, object id, name) and refuse. */
static __always_inline int ipe_seal_refuse(__u8 attempt, __u32 detail, __u64 object, const void *name)
{
	__u32 zero = 0;
	struct ipe_counters *c = ipe_map_lookup(ipe_counters, &zero);
	struct ipe_event *e;
	long n = 0;

	if (c)
		c->seal_refused++;
	e = ipe_ringbuf_reserve(ipe_events, sizeof(struct ipe_event));
	if (!e) {
		if (c)
			c->dropped++;
		return -EPERM;
	}
	if (c)
		c->audited++;
	e->boot_ns = bpf_ktime_get_boot_ns();
	e->generation = 0;
	e->ino = object;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->rule_index = detail;
	e->op = attempt;
	e->hook = 0;
	e->enforcing = 1;
	e->action = IPE_ACTION_DENY;
	e->source = IPE_SOURCE_NONE;
	e->kind = IPE_KIND_SEAL;
	e->dev[0] = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	ipe_fill_subject(e);
	e->path[0] = 0;
	if (name)
		n = bpf_probe_read_kernel_str(e->path, IPE_PATH_MAX, name);
	e->path_len = n > 0 ? n - 1 : 0;
	e->path_kind = n > 0 ? IPE_PATH_NAME : IPE_PATH_NONE;
	ipe_ringbuf_submit(e);
	return -EPERM;
}

/* The object behind file descriptor fd of the current task (its file's private_data). */
static __always_inline void *ipe_fd_object(int fd)
{
	void *task = (void *)bpf_get_current_task();
	void *files = NULL, *fdt = NULL, *table = NULL, *file = NULL, *priv = NULL;
	unsigned int max = 0;

	IPE_FIELD(files, task, struct task_struct, files);
	if (!files)
		return NULL;
	IPE_FIELD(fdt, files, struct files_struct, fdt);
	if (!fdt)
		return NULL;
	IPE_FIELD(max, fdt, struct fdtable, max_fds);
	IPE_FIELD(table, fdt, struct fdtable, fd);
	if (fd < 0 || (unsigned int)fd >= max || !table)
		return NULL;
	IPE_READ(file, table + (__u64)fd * sizeof(void *));
	if (!file)
		return NULL;
	IPE_FIELD(priv, file, struct file, private_data);
	return priv;
}

/* bpf(): element writes, deletes and freezes of our maps, detaching or updating our links. */
static __always_inline int ipe_seal_map_cmd(struct ipe_seal *s, int cmd, int fd)
{
	void *map = ipe_fd_object(fd);
	__u32 id = 0;
	int index;

	if (!map)
		return 0;
	IPE_FIELD(id, map, struct bpf_map, id);
	index = ipe_seal_map_index(s, id);
	/* map 0 is ipe_seal itself: the control plane freezes it last, once sealed */
	if (index < 0 || (index == 0 && cmd == BPF_MAP_FREEZE))
		return 0;
	return ipe_seal_refuse(IPE_SEAL_MAP_WRITE, cmd, id, map + IPE_OFFSET(struct bpf_map, name));
}

static __always_inline int ipe_seal_link_cmd(struct ipe_seal *s, int cmd, int fd)
{
	void *link = ipe_fd_object(fd), *prog = NULL, *aux = NULL;
	__u32 id = 0;

	if (!link)
		return 0;
	IPE_FIELD(id, link, struct bpf_link, id);
	if (!ipe_seal_has_link(s, id))
		return 0;
	IPE_FIELD(prog, link, struct bpf_link, prog);
	if (prog)
		IPE_FIELD(aux, prog, struct bpf_prog, aux);
	return ipe_seal_refuse(IPE_SEAL_LINK_WRITE, cmd, id, aux ? aux + IPE_OFFSET(struct bpf_prog_aux, name) : NULL);
}

IPE_HOOK(bpf, int cmd, union bpf_attr *attr, unsigned int size)
{
	struct ipe_seal *s = ipe_sealed();
	__u32 fd = 0;

	if (!s)
		return 0;
	switch (cmd) {
	case BPF_MAP_UPDATE_ELEM:
	case BPF_MAP_DELETE_ELEM:
	case BPF_MAP_LOOKUP_AND_DELETE_ELEM:
	case BPF_MAP_FREEZE:
		IPE_FIELD(fd, attr, union bpf_attr, map_fd);
		return ipe_seal_map_cmd(s, cmd, fd);
	case BPF_MAP_UPDATE_BATCH:
	case BPF_MAP_DELETE_BATCH:
	case BPF_MAP_LOOKUP_AND_DELETE_BATCH:
		IPE_FIELD(fd, attr, union bpf_attr, batch.map_fd);
		return ipe_seal_map_cmd(s, cmd, fd);
	case BPF_LINK_UPDATE:
		IPE_FIELD(fd, attr, union bpf_attr, link_update.link_fd);
		return ipe_seal_link_cmd(s, cmd, fd);
	case BPF_LINK_DETACH:
		IPE_FIELD(fd, attr, union bpf_attr, link_detach.link_fd);
		return ipe_seal_link_cmd(s, cmd, fd);
	}
	return 0;
}

#define IPE_W8(a, b, c, d, e, f, g, h)                                                            \
	((__u64)(a) | (__u64)(b) << 8 | (__u64)(c) << 16 | (__u64)(d) << 24 | (__u64)(e) << 32 | \
	 (__u64)(f) << 40 | (__u64)(g) << 48 | (__u64)(h) << 56)

/* The target of a bpf_map_elem iterator program: "bpf_iter_bpf_map_elem". */
static __always_inline int ipe_is_map_elem_iter(void *aux)
{
	union {
		char c[24];
		__u64 w[3];
	} name = {};
	const char *fname = NULL;

	IPE_FIELD(fname, aux, struct bpf_prog_aux, attach_func_name);
	if (!fname)
		return 0;
	bpf_probe_read_kernel_str(name.c, sizeof(name.c), fname);
	return name.w[0] == IPE_W8('b', 'p', 'f', '_', 'i', 't', 'e', 'r') &&
	       name.w[1] == IPE_W8('_', 'b', 'p', 'f', '_', 'm', 'a', 'p') &&
	       name.w[2] == IPE_W8('_', 'e', 'l', 'e', 'm', 0, 0, 0);
}

/* A map of ours, or a map-in-map whose inner maps could be one (same type, sizes and flags). */
static __always_inline int ipe_seal_reaches_map(struct ipe_seal *s, void *map)
{
	void *inner = NULL;
	__u32 id = 0, type = 0, key = 0, value = 0, flags = 0;

	IPE_FIELD(id, map, struct bpf_map, id);
	if (ipe_seal_map_index(s, id) >= 0)
		return 1;
	IPE_FIELD(inner, map, struct bpf_map, inner_map_meta);
	if (!inner)
		return 0;
	IPE_FIELD(type, inner, struct bpf_map, map_type);
	IPE_FIELD(key, inner, struct bpf_map, key_size);
	IPE_FIELD(value, inner, struct bpf_map, value_size);
	IPE_FIELD(flags, inner, struct bpf_map, map_flags);
	for (int i = 0; i < IPE_SEAL_MAPS; i++)
		if (i < s->nr_maps && s->map_type[i] == type && s->map_key_size[i] == key &&
		    s->map_value_size[i] == value && s->map_flags[i] == flags)
			return 1;
	return 0;
}

struct ipe_maps_walk {
	struct ipe_seal *s;
	void **maps;
	__u32 count;
	__u8 found;
};

static long ipe_maps_step(__u32 i, void *ctx)
{
	struct ipe_maps_walk *w = ctx;
	void *map = NULL;

	if (i >= w->count)
		return 1;
	IPE_READ(map, &w->maps[i]);
	if (map && ipe_seal_reaches_map(w->s, map)) {
		w->found = 1;
		return 1;
	}
	return 0;
}

/*
 * Why a program loaded after the seal must not run (IPE_REFUSE_*), or 0.  The program is
 * verified already: its type, attach type, target and used maps are final.
 */
static __always_inline __u32 ipe_prog_refusal(struct ipe_seal *s, struct bpf_prog *prog)
{
	struct ipe_maps_walk w = { .s = s };
	void *aux = NULL, *dst = NULL, *dst_aux = NULL;
	__u32 type = 0, eat = 0, id = 0, dst_type = 0, saved = 0;

	IPE_FIELD(type, prog, struct bpf_prog, type);
	IPE_FIELD(eat, prog, struct bpf_prog, expected_attach_type);
	IPE_FIELD(aux, prog, struct bpf_prog, aux);
	if (!aux)
		return 0;
	if (type == BPF_PROG_TYPE_LSM)
		return IPE_REFUSE_LSM;
	if (type == BPF_PROG_TYPE_TRACING && eat == BPF_MODIFY_RETURN)
		return IPE_REFUSE_FMOD_RET;
	if (type == BPF_PROG_TYPE_KPROBE && BPF_CORE_READ_BITFIELD_PROBED(prog, kprobe_override))
		return IPE_REFUSE_OVERRIDE;
	IPE_FIELD(dst, aux, struct bpf_prog_aux, dst_prog);
	if (dst) {
		IPE_FIELD(dst_type, dst, struct bpf_prog, type);
		IPE_FIELD(dst_aux, dst, struct bpf_prog, aux);
		if (dst_aux)
			IPE_FIELD(id, dst_aux, struct bpf_prog_aux, id);
		if (ipe_seal_has_prog(s, id) || (type == BPF_PROG_TYPE_EXT && dst_type == BPF_PROG_TYPE_LSM))
			return IPE_REFUSE_TARGET;
	}
	IPE_FIELD(saved, aux, struct bpf_prog_aux, saved_dst_prog_type);
	if (type == BPF_PROG_TYPE_EXT && saved == BPF_PROG_TYPE_LSM)
		return IPE_REFUSE_TARGET;
	if (type == BPF_PROG_TYPE_TRACING && eat == BPF_TRACE_ITER && ipe_is_map_elem_iter(aux))
		return IPE_REFUSE_MAP_ITER;
	IPE_FIELD(w.count, aux, struct bpf_prog_aux, used_map_cnt);
	IPE_FIELD(w.maps, aux, struct bpf_prog_aux, used_maps);
	if (w.maps && w.count) {
		bpf_loop(IPE_MAX_USED_MAPS, ipe_maps_step, &w, 0);
		if (w.found)
			return IPE_REFUSE_USES_MAP;
	}
	return 0;
}

/*
 * Every new fd of a program passes here, also the first, once it is verified (BPF_PROG_LOAD,
 * BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET): programs loaded after the seal that could override
 * decisions never get one.  Programs loaded before it, ours included, stay listable (bpftool).
 */
IPE_HOOK(bpf_prog, struct bpf_prog *prog)
{
	struct ipe_seal *s = ipe_sealed();
	void *aux = NULL;
	__u64 loaded = 0;
	__u32 id = 0, why;

	if (!s)
		return 0;
	IPE_FIELD(aux, prog, struct bpf_prog, aux);
	if (!aux)
		return 0;
	IPE_FIELD(loaded, aux, struct bpf_prog_aux, load_time);
	if (loaded < s->sealed_boot_ns)
		return 0;
	why = ipe_prog_refusal(s, prog);
	if (!why)
		return 0;
	IPE_FIELD(id, aux, struct bpf_prog_aux, id);
	return ipe_seal_refuse(IPE_SEAL_PROG_LOAD, why, id, aux + IPE_OFFSET(struct bpf_prog_aux, name));
}

static __always_inline int ipe_seal_dentry(struct ipe_seal *s, void *dir, void *dentry)
{
	void *inode = NULL;

	if (ipe_seal_is_dir(s, dir))
		return 1;
	if (dentry)
		IPE_FIELD(inode, dentry, struct dentry, d_inode);
	return ipe_seal_is_dir(s, inode);
}

static __always_inline int ipe_seal_refuse_dentry(void *dentry)
{
	const unsigned char *name = NULL;

	if (dentry)
		IPE_FIELD(name, dentry, struct dentry, d_name.name);
	return ipe_seal_refuse(IPE_SEAL_UNLINK, 0, 0, name);
}

IPE_HOOK(inode_unlink, struct inode *dir, struct dentry *dentry)
{
	struct ipe_seal *s = ipe_sealed();

	if (!s || !ipe_seal_dentry(s, dir, dentry))
		return 0;
	return ipe_seal_refuse_dentry(dentry);
}

IPE_HOOK(inode_rmdir, struct inode *dir, struct dentry *dentry)
{
	struct ipe_seal *s = ipe_sealed();

	if (!s || !ipe_seal_dentry(s, dir, dentry))
		return 0;
	return ipe_seal_refuse_dentry(dentry);
}

IPE_HOOK(inode_rename, struct inode *old_dir, struct dentry *old_dentry, struct inode *new_dir,
	 struct dentry *new_dentry)
{
	struct ipe_seal *s = ipe_sealed();

	if (!s)
		return 0;
	if (!ipe_seal_dentry(s, old_dir, old_dentry) && !ipe_seal_dentry(s, new_dir, new_dentry))
		return 0;
	return ipe_seal_refuse_dentry(old_dentry);
}

static __always_inline int ipe_seal_refuse_mount(__u8 attempt, __u32 flags, void *vfsmount)
{
	void *point = NULL;
	const unsigned char *name = NULL;

	if (vfsmount)
		IPE_FIELD(point, vfsmount - IPE_OFF_MOUNT_MNT, struct mount, mnt_mountpoint);
	if (point)
		IPE_FIELD(name, point, struct dentry, d_name.name);
	return ipe_seal_refuse(attempt, flags, vfsmount ? ipe_mount_id(vfsmount) : 0, name);
}

IPE_HOOK(sb_umount, struct vfsmount *mnt, int flags)
{
	struct ipe_seal *s = ipe_sealed();

	if (!s || !ipe_seal_is_mount(s, mnt))
		return 0;
	return ipe_seal_refuse_mount(IPE_SEAL_UMOUNT, flags, mnt);
}

/* mount(2) on a directory of the pins' path (remounts and propagation changes keep working) */
IPE_HOOK(sb_mount, const char *dev_name, const struct path *path, const char *type, unsigned long flags,
	 void *data)
{
	struct ipe_seal *s = ipe_sealed();
	const void *target = ipe_ctx_ptr(ctx, 1);
	void *mnt = NULL;

	if (!s || (flags & (MS_REMOUNT | MS_PROPAGATION)) || !ipe_seal_is_point(s, target))
		return 0;
	IPE_FIELD(mnt, target, struct path, mnt);
	return ipe_seal_refuse_mount(IPE_SEAL_MOUNT, flags, mnt);
}

/* move_mount(2): onto the pins' path, or moving one of its mounts away */
IPE_HOOK(move_mount, const struct path *from_path, const struct path *to_path)
{
	struct ipe_seal *s = ipe_sealed();
	const void *from = ipe_ctx_ptr(ctx, 0), *to = ipe_ctx_ptr(ctx, 1);
	void *mnt = NULL;

	if (!s)
		return 0;
	if (from)
		IPE_FIELD(mnt, from, struct path, mnt);
	if (mnt && ipe_seal_is_mount(s, mnt))
		return ipe_seal_refuse_mount(IPE_SEAL_MOUNT, 0, mnt);
	if (!ipe_seal_is_point(s, to))
		return 0;
	IPE_FIELD(mnt, to, struct path, mnt);
	return ipe_seal_refuse_mount(IPE_SEAL_MOUNT, 0, mnt);
}
#endif /* IPE_CORE: the seal */

#ifdef IPE_CORE
char LICENSE[] SEC("license") = "GPL";
#endif
