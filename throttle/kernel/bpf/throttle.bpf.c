// SPDX-License-Identifier: GPL-2.0
/*
 * throttle's kernel data path: a tc (cls_bpf, direct-action) program on the clsact ingress of each
 * censor interface. The Python engine classifies a flow while it is under inspection; once it has
 * decided, both directions of the flow go into `flows` and every later packet is handled here:
 *
 *   - passed flows are forwarded at once (redirected to the egress interface with the next hop's
 *     MAC), past netfilter, conntrack and the NFQUEUE: an unlimited flow costs the censor nothing;
 *   - limited directions, once `after_bytes` of payload have passed free, either meet their meter
 *     (`buckets`): the same policers as throttle/engine/buckets.py, a token bucket (credit refilled
 *     at `rate`, at most `burst`, a packet passes when the credit covers it, else it is dropped) or
 *     a window meter (`burst` bytes pass in each fixed interval of burst / rate, the rest of the
 *     interval is dropped: the 2021 loss pattern), or, shaped, are given their HTB class in
 *     skb->priority and queued (delayed, or dropped past the queue's bound) by the egress
 *     interface's HTB qdisc, which the censor set up, or lose packets at random (`loss`: each
 *     dropped when a draw of bpf_get_prandom_u32() falls below it, independently; the rule action
 *     "loss", loss no censor caused), counted with the policer's drops.
 *
 * Packets this program does not parse always take the normal path: IPv4 with options or
 * fragments, IPv6 with extension headers, anything but TCP and UDP, a TCP SYN (a new connection on
 * an old 5-tuple must be inspected afresh), and, when the censor routes, packets whose TTL or hop
 * limit would expire (the kernel then answers with the ICMP error, as the router it is). Every
 * return to the normal path counts its reason in `fallbacks` (per CPU; a hit counts nothing). When the
 * censor is an in-path bridge (the lab's), a flow's entries carry no MACs: frames are redirected to
 * the other port unchanged, TTL included, as an in-path device that is not a hop forwards them.
 *
 * Built by scripts/setup (`throttle kernel build`: clang -target bpf), loaded with libbpf by
 * throttle/kernel/fastpath.py. The maps' structs and the fallback reasons are in layout.h, generated
 * from throttle/kernel/layout.py; libbpf.py checks every object's BTF against that definition.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "layout.h"  /* the maps' structs and the fallback reasons: see throttle/kernel/layout.py */

#define NS_PER_S 1000000000ULL

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow_key);
	__type(value, struct flow_value);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 131072);
	__type(key, __u32);
	__type(value, struct bucket);
} buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

/* Why packets took the normal path: a count per `enum fallback_reason`, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FALLBACK_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} fallbacks SEC(".maps");

/* The censor's lease on its decisions: CLOCK_MONOTONIC ns until which the entries of `flows` hold
 * (0: no lease, they always hold). The censor renews it every second; if it dies (SIGKILL), the
 * lease runs out and every packet takes the normal path again, where the NFQUEUE rules pass it
 * with nobody bound to the queue (fail-open): no flow stays policed or shaped by a dead censor. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lease SEC(".maps");

/* Whether a window meter lets `size` bytes through now; counts them if so (engine/buckets.py
 * WindowMeter): fixed intervals of window_ns, the first from its first packet (start_ns 0 until
 * then), `burst` bytes each, in arrival order; unused bytes are not carried over. No loop: the
 * interval a late packet falls in is found by one division. Called with the lock held. */
static __always_inline int window_allows(struct bucket *b, __u64 size, __u64 now)
{
	if (!b->start_ns) {
		b->start_ns = now;
		b->used = 0;
	} else if (now > b->start_ns && now - b->start_ns >= b->window_ns) {
		b->start_ns += (now - b->start_ns) / b->window_ns * b->window_ns;
		b->used = 0;
	}
	if (b->used + size > b->burst)
		return 0;
	b->used += size;
	return 1;
}

/* Whether the direction's meter lets `size` bytes through now; takes them if so: a window meter,
 * or the token bucket (engine/buckets.py Policer), whose credit must cover them. */
static __always_inline int bucket_allows(struct bucket *b, __u64 size, __u64 now)
{
	int ok = 0;
	__u64 cost = size * NS_PER_S;

	bpf_spin_lock(&b->lock);
	if (b->window_ns) {
		ok = window_allows(b, size, now);
		bpf_spin_unlock(&b->lock);
		return ok;
	}
	if (now > b->stamp_ns) {
		__u64 elapsed = now - b->stamp_ns;
		__u64 cap = b->burst * NS_PER_S;

		if (b->rate && elapsed >= b->fill_ns) {
			b->tokens = cap;
		} else if (b->rate) {
			__u64 tokens = b->tokens + elapsed * b->rate;

			b->tokens = tokens > cap ? cap : tokens;
		}
		b->stamp_ns = now;
	}
	if (b->tokens >= cost) {
		b->tokens -= cost;
		ok = 1;
	}
	bpf_spin_unlock(&b->lock);
	return ok;
}

/* Back to the normal path, counting why: the only cost a fallback adds is this increment. */
static __always_inline int fall_back(__u32 reason)
{
	__u64 *count = bpf_map_lookup_elem(&fallbacks, &reason);

	if (count)
		*count += 1;  /* per CPU: no atomics needed */
	return TC_ACT_OK;
}

/* Whether an IPv6 next header is an extension header (RFC 8200 and IANA's list), not a transport. */
static __always_inline int ipv6_extension(__u8 next)
{
	switch (next) {
	case 0: case 43: case 44: case 50: case 51: case 60: case 135: case 139: case 140: case 253: case 254:
		return 1;
	}
	return 0;
}

SEC("tc")
int throttle_ingress(struct __sk_buff *skb)
{
	struct flow_key key = {};
	struct ethhdr eth;
	__u32 zero = 0, l3 = sizeof(struct ethhdr), l4, ip_len;
	__u64 payload = 0;
	int v6;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return fall_back(FALLBACK_SHORT);
	if (eth.h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)))
			return fall_back(FALLBACK_SHORT);
		if (ip.ihl != 5 || ip.version != 4)
			return fall_back(FALLBACK_IPV4_OPTIONS);
		if (ip.frag_off & bpf_htons(0x3FFF))
			return fall_back(FALLBACK_IPV4_FRAGMENT);
		key.family = 4;
		key.proto = ip.protocol;
		__builtin_memcpy(key.src, &ip.saddr, 4);
		__builtin_memcpy(key.dst, &ip.daddr, 4);
		ip_len = bpf_ntohs(ip.tot_len);
		l4 = l3 + sizeof(ip);
		v6 = 0;
	} else if (eth.h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, l3, &ip6, sizeof(ip6)))
			return fall_back(FALLBACK_SHORT);
		key.family = 6;
		key.proto = ip6.nexthdr;  /* only TCP or UDP right after the fixed header */
		__builtin_memcpy(key.src, &ip6.saddr, 16);
		__builtin_memcpy(key.dst, &ip6.daddr, 16);
		ip_len = sizeof(ip6) + bpf_ntohs(ip6.payload_len);
		l4 = l3 + sizeof(ip6);
		v6 = 1;
	} else {
		return fall_back(FALLBACK_NOT_IP);
	}

	if (key.proto == IPPROTO_TCP) {
		struct tcphdr tcp;

		if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)))
			return fall_back(FALLBACK_SHORT);
		if (tcp.syn)
			return fall_back(FALLBACK_TCP_SYN);  /* a new connection is inspected afresh */
		key.sport = tcp.source;
		key.dport = tcp.dest;
		if (ip_len > (l4 - l3) + tcp.doff * 4)
			payload = ip_len - (l4 - l3) - tcp.doff * 4;
	} else if (key.proto == IPPROTO_UDP) {
		struct udphdr udp;

		if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)))
			return fall_back(FALLBACK_SHORT);
		key.sport = udp.source;
		key.dport = udp.dest;
		if (bpf_ntohs(udp.len) > sizeof(udp))
			payload = bpf_ntohs(udp.len) - sizeof(udp);
	} else {
		return fall_back(v6 && ipv6_extension(key.proto) ? FALLBACK_IPV6_EXTENSION : FALLBACK_NOT_TCP_UDP);
	}

	struct flow_value *v = bpf_map_lookup_elem(&flows, &key);
	if (!v)
		return fall_back(FALLBACK_NO_FLOW);
	__u64 *until = bpf_map_lookup_elem(&lease, &zero);
	if (until && *until && bpf_ktime_get_ns() > *until)
		return fall_back(FALLBACK_LEASE_EXPIRED);  /* the censor is gone: its decisions no longer hold */

	/* A bridged direction (no MACs to write: the censor is an in-path bridge) leaves the frame
	 * as it came, TTL included. A routed one does the router's part: at TTL / hop limit 1 the
	 * kernel must answer (ICMP time exceeded). */
	int bridged = !(v->dst_mac[0] | v->dst_mac[1] | v->dst_mac[2] | v->dst_mac[3] | v->dst_mac[4] |
			v->dst_mac[5]);
	__u8 ttl;
	if (!bridged && (bpf_skb_load_bytes(skb, l3 + (v6 ? 7 : 8), &ttl, 1) || ttl <= 1))
		return fall_back(FALLBACK_TTL_EXPIRING);

	__u64 now = bpf_ktime_get_ns();
	v->last_ns = now;
	if (v->bucket || v->priority || v->loss) {
		__u64 carried = __sync_fetch_and_add(&v->payload, payload);

		if (carried >= v->after_bytes) {
			__u32 index = v->bucket;
			struct bucket *b = index ? bpf_map_lookup_elem(&buckets, &index) : 0;

			if ((b && !bucket_allows(b, ip_len, now)) ||
			    (v->loss && (__u64)bpf_get_prandom_u32() < v->loss)) {
				__sync_fetch_and_add(&v->dropped_bytes, ip_len);
				__sync_fetch_and_add(&v->dropped_packets, 1);
				return TC_ACT_SHOT;
			}
			/* A shaped direction: its HTB class on the egress interface queues it. */
			if (v->priority)
				skb->priority = v->priority;
		}
	}

	if (bridged) {
		/* as it came */
	} else if (v6) {
		ttl -= 1;
		if (bpf_skb_store_bytes(skb, l3 + 7, &ttl, 1, 0))
			return fall_back(FALLBACK_STORE_FAILED);
	} else {
		/* TTL and protocol form one 16-bit word of the header checksum. */
		__be16 old_word, new_word;

		if (bpf_skb_load_bytes(skb, l3 + 8, &old_word, 2))
			return fall_back(FALLBACK_STORE_FAILED);
		ttl -= 1;
		new_word = old_word;
		((__u8 *)&new_word)[0] = ttl;
		if (bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), old_word, new_word, 2))
			return fall_back(FALLBACK_STORE_FAILED);
		if (bpf_skb_store_bytes(skb, l3 + 8, &ttl, 1, 0))
			return TC_ACT_SHOT;  /* the checksum already changed: never let this one go on */
	}
	if (!bridged && bpf_skb_store_bytes(skb, 0, v->dst_mac, 12, 0))
		return TC_ACT_SHOT;

	__sync_fetch_and_add(&v->bytes, ip_len);
	__sync_fetch_and_add(&v->packets, 1);
	__u64 *count = bpf_map_lookup_elem(&hits, &zero);
	if (count)
		*count += 1;  /* per CPU: no atomics needed */
	return bpf_redirect(v->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";  /* the helpers used are GPL-only */
