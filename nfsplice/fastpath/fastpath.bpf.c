// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * nfsplice fast path: the steady state of a spliced pair, forwarded at tc ingress.
 *
 * The Python engine (nfsplice/engine.py) stays the authority: it does the hand-off,
 * message ends, FIN/RST, timers and everything unusual.  Once a pair is SPLICED and
 * nothing but plain data and ACKs is expected, the engine writes one `struct flow`
 * per direction into `nfs_flows`, keyed by the 4-tuple the packet arrives with, and
 * this program applies exactly the translation packet.rewrite() would (addresses,
 * ports, seq/ack offsets, window scale, TSval/TSecr) and redirects the packet to the
 * other side's device.  A packet it is not sure about goes on unchanged to netfilter,
 * where the rules queue it to the engine ("punt"):
 *
 *   SYN, FIN, RST or URG, or no ACK       state changes: the engine must see them
 *   options other than Linux's usual layouts of TS and SACK
 *   payload past the direction's end     a message end (HTTP body) is cut by the engine
 *   an ACK reaching the watched sequence the other direction's message end or FIN is
 *                                        acknowledged: the engine decides what follows
 *   TSecr below the floor                 the engine floors it
 *   IP options, fragments, BIG TCP       never spliced fast
 *
 * The per-flow counters (packets, bytes, last packet time, highest sequence seen) are
 * how the engine learns what the fast path did: idle timers, resume numbers, stats.
 * They live in `nfs_progress`, apart from the flows: the engine rewrites a flow in place
 * whenever the pair changes (an update replaces the whole element), and counts kept in
 * it were lost if a packet came between the engine's read and its write.  The engine
 * creates a flow's counters before the flow and deletes them after the flow, with the
 * final read; a fast packet whose counters are missing is punted (the engine counts it).
 * Flows in mode QUEUE are only marked (skb->mark) for the rules and go on; during a
 * hand-off (F_PASS_ACKS) pure ACKs are not even marked: the engine would only pass
 * them on to the proxy's socket, and the proxy's drain waits for them.
 *
 * Checksums: the helpers handle every ip_summed state: with CHECKSUM_PARTIAL (a GSO
 * packet from a local stack over veth) only the pseudo-header part of the change is
 * applied, otherwise the whole difference (RFC 1624 arithmetic, done by the kernel).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define F_FAST   1   /* rewrite and redirect; otherwise only mark for the queue */
#define F_END    2   /* end_seq is set: payload past it is punted */
#define F_WATCH  4   /* ack_watch is set: a translated ack reaching it is punted */
#define F_FLOOR  8   /* tsecr_floor is set */
#define F_TAP   16   /* copy the payload into nfs_tap for the engine's tap sinks */
#define F_PASS_ACKS 32  /* not fast: pure ACKs pass unmarked (a hand-off) */
#define F_C2S   64   /* the client's direction (which zero-window counter) */
#define F_LIMIT 128  /* a pair that resumes: no window offered past ack_watch + NEXT_MESSAGE_WINDOW */
#ifndef WATCH_COPY_MARK
#define WATCH_COPY_MARK 0x6E730003  /* engine.WATCH_COPY_MARK: the rules queue it like QUEUE_MARK */
#endif
#ifndef NEXT_MESSAGE_WINDOW
#define NEXT_MESSAGE_WINDOW 65536   /* the engine passes its own (engine.NEXT_MESSAGE_WINDOW) */
#endif
#define TAP_MAX 65536

struct flow_key {
	__u32 saddr, daddr;     /* network order, as the packet arrives */
	__u16 sport, dport;
};

struct flow {
	__u32 saddr, daddr;     /* the packet leaves with these (network order) */
	__u16 sport, dport;
	__u32 seq_delta, ack_delta, tsval_delta, tsecr_delta;   /* host order, mod 2^32 */
	__u32 end_seq;          /* sender's space */
	__u32 ack_watch;        /* receiver's space (after translation) */
	__u32 tsecr_floor;
	__u32 ifindex;          /* egress device; 0: let the stack route it */
	__u32 mark;             /* skb mark of punted packets and QUEUE flows */
	__u8 win_in, win_out, flags;
	/* written by this program; each write of the flow resets them (a hand-off's own) */
	__u8 ts_seen;           /* F_PASS_ACKS flows: last_tsval is set */
	__u32 last_tsval;       /* F_PASS_ACKS flows: the sender's latest TSval */
};

/* What this program forwarded for one flow key since the engine created the entry:
 * it outlives the rewrites of the flow, so nothing counted is lost to them. */
struct progress {
	__u64 packets, bytes, last_ns;
	__u32 next_seq;         /* highest seq + len forwarded (valid once packets > 0) */
	__u32 max_tsval;        /* highest TSval forwarded, translated (0: none yet) */
};

enum {
	S_FAST_PACKETS, S_FAST_BYTES, S_QUEUE_MARKED,
	P_FLAGS, P_OPTIONS, P_END, P_WATCH, S_TSECR_FLOORED, S_ZERO_WINDOW_C2S, P_SHAPE, P_REDIRECT,
	S_TAP_RECORDS, P_TAP_FULL, S_PASSED_ACKS, P_NO_PROGRESS, S_ZERO_WINDOW_S2C, S_WINDOW_LIMITED,
	S_WATCH_COPIES,
	S_MAX
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow_key);
	__type(value, struct flow);
} nfs_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow_key);
	__type(value, struct progress);
} nfs_progress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, S_MAX);
	__type(key, __u32);
	__type(value, __u64);
} nfs_stats SEC(".maps");

/* The tap, two ways (chosen when the program is compiled):
 *
 * TAP_CLONE_IFINDEX defined: each tapped packet is cloned, as it arrived (the rewrite
 * below changes the original only), out of that device: one end of a veth pair the
 * nfsplice instance owns, where an AF_PACKET socket keeps the clones.  A clone shares
 * the payload's pages, so nothing is copied on this CPU; the consumer copies it out
 * later, elsewhere.  A clone the socket has no room for is lost (counted by the
 * socket, not here): the consumer cannot tell which object has the hole, so the store's
 * refusal of an incomplete body is what keeps a lossy fill out of the cache.
 *
 * Otherwise the ring: one record per forwarded payload, with the arrival key and the
 * sender's sequence number, so the engine puts it at its stream offset exactly as it
 * does for the packets it forwards itself.  A record always reserves TAP_MAX bytes (the
 * size must be a constant); when the ring is full the packet goes to the engine
 * instead, which taps it there: nothing is lost to a slow consumer, it only costs
 * speed (the copy into the ring costs it too: README, Cache). */
struct tap_rec {
	struct flow_key key;
	__u32 seq;
	__u32 len;
	__u8 data[TAP_MAX];
};

#ifdef TAP_CLONE_IFINDEX
#define TAP_RING_BYTES 4096     /* unused: the smallest ring the kernel makes */
#else
#define TAP_RING_BYTES (64 << 20)
#endif
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, TAP_RING_BYTES);
} nfs_tap SEC(".maps");

static __always_inline void count(__u32 what, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&nfs_stats, &what);
	if (v)
		*v += n;
}

/* skb->mark through the context pointer itself: the verifier refuses a store through
 * a pointer computed from it, which the compiler makes when several stores share one. */
static __always_inline void set_mark(struct __sk_buff *skb, __u32 mark)
{
	asm volatile("" : "+r"(skb));
	skb->mark = mark;
}

static __always_inline int punt(struct __sk_buff *skb, struct flow *f, __u32 why)
{
	count(why, 1);
	set_mark(skb, f->mark);
	return TC_ACT_OK;
}

#define ETH_LEN 14
#define IP_OFF ETH_LEN
#define TCP_OFF (ETH_LEN + 20)
#define TCP_CSUM_OFF (TCP_OFF + 16)
#define IP_CSUM_OFF (IP_OFF + 10)

SEC("tc")
int nfsplice_fast(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip;
	struct tcphdr *th;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	if (skb->mark == WATCH_COPY_MARK)
		return TC_ACT_OK;        /* our own copy of a watched ACK (below): to the queue */
	__u32 want = skb->len < TCP_OFF + 60 ? skb->len : TCP_OFF + 60;
	if (data + want > data_end) {
		/* Headers not all in the linear part: pull them in. */
		if (bpf_skb_pull_data(skb, want))
			return TC_ACT_UNSPEC;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	if (data + TCP_OFF + 20 > data_end)
		return TC_ACT_UNSPEC;
	ip = data + IP_OFF;
	if (ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
		return TC_ACT_UNSPEC;
	th = data + TCP_OFF;

	struct flow_key key = {ip->saddr, ip->daddr, th->source, th->dest};
	struct flow *f = bpf_map_lookup_elem(&nfs_flows, &key);
	if (!f)
		return TC_ACT_UNSPEC;
	if (!(f->flags & F_FAST)) {
		if (f->flags & F_PASS_ACKS && th->doff == 8 && data + TCP_OFF + 32 <= data_end) {
			/* The splice needs each side's current TSval; the engine no longer
			 * sees the pure ACKs of a hand-off, so the program keeps it. */
			__u8 *o = (__u8 *)th + 20;
			if (o[0] == 1 && o[1] == 1 && o[2] == 8 && o[3] == 10) {
				f->last_tsval = bpf_ntohl(*(__u32 *)(o + 4));
				f->ts_seen = 1;
			}
		}
		if (f->flags & F_PASS_ACKS && !(((__u8 *)th)[13] & 0x07) &&
		    bpf_ntohs(ip->tot_len) == 20 + th->doff * 4) {
			/* A pure ACK of a pair being handed off: the engine would only let it
			 * through to the proxy's socket, whose drain waits for it. */
			count(S_PASSED_ACKS, 1);
			return TC_ACT_UNSPEC;
		}
		count(S_QUEUE_MARKED, 1);
		set_mark(skb, f->mark);
		return TC_ACT_OK;
	}
	if (ip->frag_off & bpf_htons(0x3fff) || ip->tot_len == 0)
		return punt(skb, f, P_SHAPE);

	__u8 *tcpb = (__u8 *)th;
	__u8 flags = tcpb[13];
	if ((flags & (0x01 | 0x02 | 0x04 | 0x20)) || !(flags & 0x10))   /* FIN SYN RST URG; ACK */
		return punt(skb, f, P_FLAGS);
	/* Options: none, or the layouts Linux sends: NOP,NOP,TS; NOP,NOP,TS,NOP,NOP,SACK;
	 * NOP,NOP,SACK (1-4 blocks).  Anything else is the engine's. */
	__u32 doff = th->doff * 4;
	int has_ts = 0;
	__u32 sack_at = 0, edges = 0;    /* offset of the first SACK edge in the header */
	if (doff > 20) {
		if (data + TCP_OFF + doff > data_end || data + TCP_OFF + 24 > data_end)
			return punt(skb, f, P_SHAPE);
		if (tcpb[20] != 1 || tcpb[21] != 1)
			return punt(skb, f, P_OPTIONS);
		if (tcpb[22] == 8 && tcpb[23] == 10) {
			if (data + TCP_OFF + 32 > data_end)
				return punt(skb, f, P_SHAPE);
			has_ts = 1;
			if (doff > 32) {
				if (data + TCP_OFF + 36 > data_end)
					return punt(skb, f, P_SHAPE);
				if (tcpb[32] != 1 || tcpb[33] != 1 || tcpb[34] != 5 || tcpb[35] != doff - 34)
					return punt(skb, f, P_OPTIONS);
				sack_at = 36;
			}
		} else if (tcpb[22] == 5 && tcpb[23] == doff - 22) {
			sack_at = 24;
		} else {
			return punt(skb, f, P_OPTIONS);
		}
		if (sack_at) {
			if ((doff - sack_at) % 8 || doff - sack_at > 32)
				return punt(skb, f, P_OPTIONS);
			edges = (doff - sack_at) / 4;
		} else if (doff != 32) {
			return punt(skb, f, P_OPTIONS);
		}
	}
	__u32 tot = bpf_ntohs(ip->tot_len);
	if (tot < 20 + doff)
		return punt(skb, f, P_SHAPE);
	__u32 plen = tot - 20 - doff;
	__u32 seq = bpf_ntohl(th->seq);
	__u32 nxt = seq + plen;
	if ((f->flags & F_END) && (__s32)(nxt - f->end_seq) > 0)
		return punt(skb, f, P_END);
	__u32 ack = bpf_ntohl(th->ack_seq) + f->ack_delta;
	if ((f->flags & F_WATCH) && (__s32)(ack - f->ack_watch) >= 0) {
		if (plen || !(f->flags & F_LIMIT))
			return punt(skb, f, P_WATCH);
		/* A pure ACK reaching the watched message end of a pair that resumes: the
		 * sender needs it now (under load the queue ran long enough behind for its
		 * retransmission timer to fire, about every other response), the engine needs
		 * to see it (the message is done).  A copy goes to the queue (the engine
		 * reads it and drops it), this one goes on. */
		set_mark(skb, WATCH_COPY_MARK);
		long r = bpf_clone_redirect(skb, skb->ifindex, BPF_F_INGRESS);
		set_mark(skb, 0);
		if (r)
			return punt(skb, f, P_WATCH);
		count(S_WATCH_COPIES, 1);
		data = (void *)(long)skb->data;      /* (the helper may have moved the packet) */
		data_end = (void *)(long)skb->data_end;
		if (data + TCP_OFF + 20 > data_end || (has_ts && data + TCP_OFF + 32 > data_end))
			return punt(skb, f, P_SHAPE);
		ip = data + IP_OFF;
		th = data + TCP_OFF;
		tcpb = (__u8 *)th;
	}
	__u16 win = bpf_ntohs(th->window);   /* zero: forwarded zero, and counted below */

	/* The TCP header words that change (ports, seq, ack, doff/flags/window, TSval,
	 * TSecr), old and new, for one checksum difference. */
	__u32 old[14] = {}, new[14] = {};
	old[0] = *(__u32 *)&th->source;
	old[1] = th->seq;
	old[2] = th->ack_seq;
	old[3] = *(__u32 *)(tcpb + 12);
	old[4] = 0;
	old[5] = 0;
	__u32 w = win;
	if (f->win_in != f->win_out && win) {
		w = (w << (f->win_in & 15)) >> (f->win_out & 15);
		if (w > 0xffff)
			w = 0xffff;
		if (w == 0)
			w = 1;   /* win != 0 here: a non-zero window never becomes zero */
	}
	if ((f->flags & F_LIMIT) && w) {
		/* A pair that resumes: what the sender sends past the other direction's
		 * message end waits in the proxy's rebuilt socket, so it is offered no more
		 * than NEXT_MESSAGE_WINDOW there (engine._forward does the same).  ack is at
		 * most ack_watch here (an ACK reaching it went on above, and nothing past the
		 * message end was forwarded to be acknowledged): 0 <= room, and room is taken
		 * unsigned, as packet.limit_window takes it. */
		__u32 room = f->ack_watch + NEXT_MESSAGE_WINDOW - ack;
		if ((w << (f->win_out & 15)) > room) {
			w = room >> (f->win_out & 15);
			if (w == 0)
				w = 1;
			count(S_WINDOW_LIMITED, 1);
		}
	}
	__u16 ports[2] = {f->sport, f->dport};
	new[0] = *(__u32 *)ports;
	new[1] = bpf_htonl(seq + f->seq_delta);
	new[2] = bpf_htonl(ack);
	__u16 ofl_win[2] = {*(__u16 *)(tcpb + 12), bpf_htons((__u16)w)};
	new[3] = *(__u32 *)ofl_win;
	new[4] = 0;
	new[5] = 0;
	if (has_ts) {
		old[4] = *(__u32 *)(tcpb + 24);
		old[5] = *(__u32 *)(tcpb + 28);
		__u32 tsecr = bpf_ntohl(old[5]) + f->tsecr_delta;
		if ((f->flags & F_FLOOR) && (__s32)(tsecr - f->tsecr_floor) < 0) {
			/* An echo of a TSval the proxy's socket sent before the splice: raised
			 * to the floor, as packet.rewrite does (it was punted for that, ~12
			 * times a spliced response, the client acknowledging the drain). */
			tsecr = f->tsecr_floor;
			count(S_TSECR_FLOORED, 1);
		}
		new[4] = bpf_htonl(bpf_ntohl(old[4]) + f->tsval_delta);
		new[5] = bpf_htonl(tsecr);
	}
	/* SACK edges are acknowledgement space: + ack_delta, like the ack itself. */
	__u32 *edge = (void *)tcpb + sack_at;
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i >= edges)
			break;
		if ((void *)(edge + i + 1) > data_end)
			return punt(skb, f, P_SHAPE);
		old[6 + i] = edge[i];
		new[6 + i] = bpf_htonl(bpf_ntohl(edge[i]) + f->ack_delta);
	}
	__u32 old_addr[2] = {ip->saddr, ip->daddr};
	__u32 new_addr[2] = {f->saddr, f->daddr};
	struct progress *pg = bpf_map_lookup_elem(&nfs_progress, &key);
	if (!pg)
		return punt(skb, f, P_NO_PROGRESS);

	if ((f->flags & F_TAP) && plen) {
		if (plen > TAP_MAX)
			return punt(skb, f, P_SHAPE);
#ifdef TAP_CLONE_IFINDEX
		/* Fails only when the device is gone or down: the engine taps it then. */
		if (bpf_clone_redirect(skb, TAP_CLONE_IFINDEX, 0))
			return punt(skb, f, P_TAP_FULL);
#else
		struct tap_rec *rec = bpf_ringbuf_reserve(&nfs_tap, sizeof(*rec), 0);
		if (!rec)
			return punt(skb, f, P_TAP_FULL);
		rec->key = key;
		rec->seq = seq;
		rec->len = plen;
		if (bpf_skb_load_bytes(skb, TCP_OFF + doff, rec->data, plen)) {
			bpf_ringbuf_discard(rec, 0);
			return punt(skb, f, P_SHAPE);
		}
		bpf_ringbuf_submit(rec, 0);
#endif
		count(S_TAP_RECORDS, 1);
	}

	/* Progress, before the packet goes: the engine reads it for timers and resumes. */
	__sync_fetch_and_add(&pg->packets, 1);
	__sync_fetch_and_add(&pg->bytes, plen);
	pg->last_ns = bpf_ktime_get_ns();
	if (pg->packets == 1 || (__s32)(nxt - pg->next_seq) > 0)
		pg->next_seq = nxt;
	if (has_ts) {
		/* The engine forwards what reaches it late (queued before this flow turned
		 * fast, or punted) with a TSval no older than this: PAWS drops older ones. */
		__u32 tv = bpf_ntohl(new[4]);
		if (!pg->max_tsval || (__s32)(tv - pg->max_tsval) > 0)
			pg->max_tsval = tv;
	}

	__s64 d_addr = bpf_csum_diff(old_addr, 8, new_addr, 8, 0);
	__s64 d_tcp = bpf_csum_diff(old, sizeof(old), new, sizeof(new), 0);
	if (d_addr < 0 || d_tcp < 0)
		return punt(skb, f, P_SHAPE);
	bpf_l3_csum_replace(skb, IP_CSUM_OFF, 0, d_addr, 0);
	bpf_l4_csum_replace(skb, TCP_CSUM_OFF, 0, d_addr, BPF_F_PSEUDO_HDR);
	bpf_l4_csum_replace(skb, TCP_CSUM_OFF, 0, d_tcp, 0);
	bpf_skb_store_bytes(skb, IP_OFF + 12, new_addr, 8, 0);
	bpf_skb_store_bytes(skb, TCP_OFF, new, 16, 0);
	if (has_ts)
		bpf_skb_store_bytes(skb, TCP_OFF + 24, &new[4], 8, 0);
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i >= edges)
			break;
		bpf_skb_store_bytes(skb, TCP_OFF + sack_at + 4 * i, &new[6 + i], 4, 0);
	}
	count(S_FAST_PACKETS, 1);
	count(S_FAST_BYTES, plen);
	if (win == 0)   /* the engine's window.zero_c2s / _s2c */
		count(f->flags & F_C2S ? S_ZERO_WINDOW_C2S : S_ZERO_WINDOW_S2C, 1);
	if (f->ifindex) {
		long r = bpf_redirect_neigh(f->ifindex, NULL, 0, 0);
		if (r != TC_ACT_REDIRECT)
			count(P_REDIRECT, 1);
		return r;
	}
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual MIT/GPL";
