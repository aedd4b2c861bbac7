// SPDX-License-Identifier: GPL-2.0
/*
 * throttle's kernel data path: a tc (cls_bpf, direct-action) program on the clsact ingress of each
 * censor interface. The Python engine classifies a flow while it is under inspection; once it has
 * decided, both directions of the flow go into `flows` and every later packet is handled here:
 *
 *   - passed flows are forwarded at once (redirected to the egress interface with the next hop's
 *     MAC), past netfilter, conntrack and the NFQUEUE: an unlimited flow costs the censor nothing;
 *   - limited directions, once `after_bytes` of payload have passed free, either meet their token
 *     bucket (`buckets`): the same policer as throttle/engine/buckets.py (credit refilled at
 *     `rate`, at most `burst`, a packet passes when the credit covers it, else it is dropped), or,
 *     shaped, are given their HTB class in skb->priority and queued (delayed, or dropped past the
 *     queue's bound) by the egress interface's HTB qdisc, which the censor set up.
 *
 * Packets this program does not parse always take the normal path: IPv4 with options or
 * fragments, IPv6 with extension headers, anything but TCP and UDP, a TCP SYN (a new connection on
 * an old 5-tuple must be inspected afresh), and, when the censor routes, packets whose TTL or hop
 * limit would expire (the kernel then answers with the ICMP error, as the router it is). When the
 * censor is an in-path bridge (the lab's), a flow's entries carry no MACs: frames are redirected to
 * the other port unchanged, TTL included, as an in-path device that is not a hop forwards them.
 *
 * Built by scripts/setup (clang -target bpf), loaded with libbpf by throttle/kernel/fastpath.py,
 * whose Python structs mirror the two map values below.
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

#define NS_PER_S 1000000000ULL

struct flow_key {           /* one direction of a flow, addresses and ports as on the wire */
	__u8 proto;             /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;            /* 4 or 6 */
	__u8 pad[2];
	__u8 src[16];           /* IPv4: the first 4 bytes, the rest zero */
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
};

struct flow_value {
	__u32 ifindex;          /* egress interface */
	__u8 dst_mac[6];        /* the next hop's; all zero: bridged, the frame goes out as it came */
	__u8 src_mac[6];        /* the egress interface's */
	__u64 last_ns;          /* CLOCK_MONOTONIC of the last packet seen, for idle expiry */
	__u64 bytes;            /* IP bytes forwarded */
	__u64 packets;
	__u64 dropped_bytes;    /* IP bytes the policer dropped */
	__u64 dropped_packets;
	__u64 payload;          /* transport payload carried so far, dropped packets included */
	__u64 after_bytes;      /* payload that passes before the bucket applies */
	__u32 bucket;           /* index into `buckets`; 0: this direction is not limited */
	__u32 priority;         /* skb->priority: the shaper's HTB class (major:minor); 0: not shaped */
};

struct bucket {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 rate;             /* bytes per second; 0 freezes once the burst is spent */
	__u64 burst;            /* bytes */
	__u64 fill_ns;          /* how long an empty bucket takes to fill: burst / rate */
	__u64 tokens;           /* credit, in bytes x 10^9 */
	__u64 stamp_ns;         /* when the credit was last brought up to date */
};

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

/* Whether the bucket's credit covers `size` bytes now; takes it if so (engine/buckets.py Policer). */
static __always_inline int bucket_allows(struct bucket *b, __u64 size, __u64 now)
{
	int ok = 0;
	__u64 cost = size * NS_PER_S;

	bpf_spin_lock(&b->lock);
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

SEC("tc")
int throttle_ingress(struct __sk_buff *skb)
{
	struct flow_key key = {};
	struct ethhdr eth;
	__u32 zero = 0, l3 = sizeof(struct ethhdr), l4, ip_len;
	__u64 payload = 0;
	int v6;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return TC_ACT_OK;
	if (eth.h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)))
			return TC_ACT_OK;
		if (ip.ihl != 5 || ip.version != 4 || (ip.frag_off & bpf_htons(0x3FFF)))
			return TC_ACT_OK;  /* options, or a fragment */
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
			return TC_ACT_OK;
		key.family = 6;
		key.proto = ip6.nexthdr;  /* only TCP or UDP right after the fixed header */
		__builtin_memcpy(key.src, &ip6.saddr, 16);
		__builtin_memcpy(key.dst, &ip6.daddr, 16);
		ip_len = sizeof(ip6) + bpf_ntohs(ip6.payload_len);
		l4 = l3 + sizeof(ip6);
		v6 = 1;
	} else {
		return TC_ACT_OK;
	}

	if (key.proto == IPPROTO_TCP) {
		struct tcphdr tcp;

		if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)))
			return TC_ACT_OK;
		if (tcp.syn)
			return TC_ACT_OK;  /* a new connection is inspected afresh */
		key.sport = tcp.source;
		key.dport = tcp.dest;
		if (ip_len > (l4 - l3) + tcp.doff * 4)
			payload = ip_len - (l4 - l3) - tcp.doff * 4;
	} else if (key.proto == IPPROTO_UDP) {
		struct udphdr udp;

		if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)))
			return TC_ACT_OK;
		key.sport = udp.source;
		key.dport = udp.dest;
		if (bpf_ntohs(udp.len) > sizeof(udp))
			payload = bpf_ntohs(udp.len) - sizeof(udp);
	} else {
		return TC_ACT_OK;
	}

	struct flow_value *v = bpf_map_lookup_elem(&flows, &key);
	if (!v)
		return TC_ACT_OK;
	__u64 *until = bpf_map_lookup_elem(&lease, &zero);
	if (until && *until && bpf_ktime_get_ns() > *until)
		return TC_ACT_OK;  /* the censor is gone: its decisions no longer hold */

	/* A bridged direction (no MACs to write: the censor is an in-path bridge) leaves the frame
	 * as it came, TTL included. A routed one does the router's part: at TTL / hop limit 1 the
	 * kernel must answer (ICMP time exceeded). */
	int bridged = !(v->dst_mac[0] | v->dst_mac[1] | v->dst_mac[2] | v->dst_mac[3] | v->dst_mac[4] |
			v->dst_mac[5]);
	__u8 ttl;
	if (!bridged && (bpf_skb_load_bytes(skb, l3 + (v6 ? 7 : 8), &ttl, 1) || ttl <= 1))
		return TC_ACT_OK;

	__u64 now = bpf_ktime_get_ns();
	v->last_ns = now;
	if (v->bucket || v->priority) {
		__u64 carried = __sync_fetch_and_add(&v->payload, payload);

		if (carried >= v->after_bytes) {
			__u32 index = v->bucket;
			struct bucket *b = index ? bpf_map_lookup_elem(&buckets, &index) : 0;

			if (b && !bucket_allows(b, ip_len, now)) {
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
			return TC_ACT_OK;
	} else {
		/* TTL and protocol form one 16-bit word of the header checksum. */
		__be16 old_word, new_word;

		if (bpf_skb_load_bytes(skb, l3 + 8, &old_word, 2))
			return TC_ACT_OK;
		ttl -= 1;
		new_word = old_word;
		((__u8 *)&new_word)[0] = ttl;
		if (bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), old_word, new_word, 2))
			return TC_ACT_OK;
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
