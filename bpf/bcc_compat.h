/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Everything BCC-specific lives here: map declarations, map method calls and the
 * LSM_PROBE hook wrapper.  ipe_bpf.bpf.c only calls the ipe_*() functions and the
 * IPE_HOOK() macro below, so a libbpf/CO-RE build can supply its own version of this
 * file (SEC(".maps") declarations, bpf_map_*_elem, SEC("lsm/...") BPF_PROG) and
 * compile the same program source.
 *
 * Sizes that the loader picks at load time arrive as -D defines:
 *   IPE_RULES_MAX, IPE_DIGESTS_MAX, IPE_DEVICES_MAX, IPE_RINGBUF_PAGES
 */
#ifndef IPE_BCC_COMPAT_H
#define IPE_BCC_COMPAT_H

#ifndef IPE_RULES_MAX
#define IPE_RULES_MAX (1 << 20)
#endif
#ifndef IPE_DIGESTS_MAX
#define IPE_DIGESTS_MAX (1 << 18)
#endif
#ifndef IPE_DEVICES_MAX
#define IPE_DEVICES_MAX 1024
#endif
#ifndef IPE_RINGBUF_PAGES
#define IPE_RINGBUF_PAGES 64
#endif

/* One BPF LSM program per hook; `name` is the LSM hook name. */
#define IPE_HOOK(name, args...) LSM_PROBE(name, args)

BPF_ARRAY(ipe_config, struct ipe_config, 1);
BPF_ARRAY(ipe_defaults, struct ipe_policy_defaults, IPE_SLOTS);
BPF_F_TABLE("hash", struct ipe_digest_key, __u32, ipe_digests, IPE_DIGESTS_MAX, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct ipe_rule_key, struct ipe_rule_value, ipe_rules, IPE_RULES_MAX, BPF_F_NO_PREALLOC);
BPF_HASH(ipe_devices, __u32, struct ipe_bdev_state, IPE_DEVICES_MAX);
BPF_PERCPU_ARRAY(ipe_counters, struct ipe_counters, 1);
BPF_RINGBUF_OUTPUT(ipe_events, IPE_RINGBUF_PAGES);
BPF_INODE_STORAGE(ipe_inodes, struct ipe_inode_state);
BPF_PERCPU_ARRAY(ipe_scratch, struct ipe_path_scratch, 1);

static __always_inline struct ipe_config *ipe_config_get(void)
{
	int zero = 0;
	return ipe_config.lookup(&zero);
}

static __always_inline struct ipe_policy_defaults *ipe_defaults_get(int slot)
{
	return ipe_defaults.lookup(&slot);
}

static __always_inline __u32 *ipe_digest_lookup(struct ipe_digest_key *key)
{
	return ipe_digests.lookup(key);
}

static __always_inline struct ipe_rule_value *ipe_rule_lookup(struct ipe_rule_key *key)
{
	return ipe_rules.lookup(key);
}

static __always_inline struct ipe_bdev_state *ipe_device_lookup(__u32 dev)
{
	return ipe_devices.lookup(&dev);
}

static __always_inline void ipe_device_update(__u32 dev, struct ipe_bdev_state *state)
{
	ipe_devices.update(&dev, state);
}

static __always_inline void ipe_device_delete(__u32 dev)
{
	ipe_devices.delete(&dev);
}

static __always_inline struct ipe_counters *ipe_counters_get(void)
{
	int zero = 0;
	return ipe_counters.lookup(&zero);
}

static __always_inline struct ipe_path_scratch *ipe_scratch_get(void)
{
	int zero = 0;
	return ipe_scratch.lookup(&zero);
}

static __always_inline struct ipe_event *ipe_event_reserve(void)
{
	return ipe_events.ringbuf_reserve(sizeof(struct ipe_event));
}

static __always_inline void ipe_event_submit(struct ipe_event *event)
{
	ipe_events.ringbuf_submit(event, 0);
}

static __always_inline struct ipe_inode_state *ipe_inode_get(const struct inode *inode, int create)
{
	return ipe_inodes.inode_storage_get((void *)inode, 0,
					    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

#endif /* IPE_BCC_COMPAT_H */
