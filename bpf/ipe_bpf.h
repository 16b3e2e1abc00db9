/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Structs and constants shared by the BPF-LSM program and the Python control plane.
 * Python derives every layout below from this file (ipe_bpf/policy/layout.py); do not
 * restate them by hand elsewhere.
 */
#ifndef IPE_BPF_H
#define IPE_BPF_H

#define IPE_NR_OPS 8		/* policy ops 0..6 plus UNKNOWN (7) */
#define IPE_OP_UNKNOWN 7
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

/* digests map: a digest that the policy in `slot` names -> its id (> 0). */
struct ipe_digest_key {
	__u8 slot;
	__u8 kind;		/* IPE_DIGEST_* */
	__u8 alg_len;
	__u8 len;
	char alg[IPE_ALG_MAX];
	__u8 value[IPE_DIGEST_MAX];
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
	__u8 pad[6];
	__u64 generation;		/* which deployed policy fills this slot */
};

#endif /* IPE_BPF_H */
