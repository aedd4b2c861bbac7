/* SPDX-License-Identifier: GPL-2.0 */

/* Generated from throttle/kernel/layout.py, the one definition of the data this program shares with
 * Python: edit that, then run `throttle kernel build`, which rewrites this file. Do not edit it here. */

#ifndef THROTTLE_LAYOUT_H
#define THROTTLE_LAYOUT_H

#include <linux/types.h>
#include <linux/bpf.h>

struct flow_key {               /* one direction of a flow, addresses and ports as on the wire */
	__u8 proto;             /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;            /* 4 or 6 */
	__u8 pad[2];
	__u8 src[16];           /* IPv4: the first 4 bytes, the rest zero */
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
};

struct flow_value {             /* what the program does with one direction, and what it did */
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
	__u64 loss;             /* random loss: a packet drops when a 32-bit random draw is below this; 0: none */
};

struct bucket {                 /* a policer's meter (engine/buckets.py): a token bucket, or a window */
	struct bpf_spin_lock lock; /* the kernel's; Python leaves it zero */
	__u32 pad;
	__u64 rate;             /* bytes per second; 0 freezes once the burst is spent */
	__u64 burst;            /* bytes (a window's: its budget per interval) */
	__u64 fill_ns;          /* how long an empty bucket takes to fill: burst / rate */
	__u64 tokens;           /* credit, in bytes x 10^9 */
	__u64 stamp_ns;         /* when the credit was last brought up to date */
	__u64 window_ns;        /* a window's interval, burst / rate; 0: a token bucket (Policer) */
	__u64 start_ns;         /* when the window's interval began; 0: at its next packet */
	__u64 used;             /* bytes the window passed in its interval */
};

enum fallback_reason {          /* why a packet took the normal path: its index in `fallbacks` */
	FALLBACK_SHORT = 0,             /* the frame ends inside a header the program reads */
	FALLBACK_NOT_IP = 1,            /* neither IPv4 nor IPv6 (ARP, a VLAN tag, ...) */
	FALLBACK_IPV4_OPTIONS = 2,      /* an IPv4 header with options (or not version 4) */
	FALLBACK_IPV4_FRAGMENT = 3,     /* an IPv4 fragment */
	FALLBACK_IPV6_EXTENSION = 4,    /* an IPv6 extension header before the transport's */
	FALLBACK_NOT_TCP_UDP = 5,       /* a transport other than TCP and UDP */
	FALLBACK_TCP_SYN = 6,           /* a TCP SYN: a new connection on an old 5-tuple is inspected afresh */
	FALLBACK_NO_FLOW = 7,           /* no entry in `flows`: not decided (yet), or not the fast path's */
	FALLBACK_LEASE_EXPIRED = 8,     /* the censor's lease ran out: its decisions no longer hold */
	FALLBACK_TTL_EXPIRING = 9,      /* a routed direction whose TTL or hop limit would expire here */
	FALLBACK_STORE_FAILED = 10,     /* rewriting the TTL or the IPv4 checksum failed */
	FALLBACK_REASONS = 11
};

#endif
