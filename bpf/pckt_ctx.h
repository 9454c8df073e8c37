/* pckt_ctx.h - the few things that differ between an XDP frame and a TC skb.
 *
 * The steering core (edge.bpf.c, worker.bpf.c) is written once against these
 * accessors; every function takes `void *ctx, const int tc` and is always_inline,
 * so each entry point (XDP: tc = 0, TC: tc = 1) compiles to code for its own
 * context only (the constant folds every `if (tc)` away). Verdicts inside the
 * core are XDP's (EP_PASS/EP_DROP/EP_TX); the TC entries translate them with
 * tc_verdict(): PASS -> TC_ACT_OK, DROP -> TC_ACT_SHOT, TX -> bpf_redirect back
 * out of the ingress device.
 *
 * TC specifics kept here:
 * - the headers may sit in paged data: ep_pull_headers() makes the first bytes
 *   linear once at entry; the packet's full length is skb->len, not data_end;
 * - address/port rewrites go through bpf_l3/l4_csum_replace (BPF_F_PSEUDO_HDR for
 *   addresses) so CHECKSUM_PARTIAL (GSO) skbs stay right;
 * - encap/decap use bpf_skb_adjust_room at the MAC layer with the ENCAP/DECAP
 *   L3 flags so a GSO super-packet stays whole (the kernel fixes gso_type and
 *   gso_size) instead of being cut into MTU-sized frames.
 */
#ifndef EDGEPROXY_PCKT_CTX_H
#define EDGEPROXY_PCKT_CTX_H

#include <uapi/linux/pkt_cls.h>
#include "csum_helpers.h"

/* newer uapi than Debian's 6.1 headers (bcc compiles against those) */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif

#define EP_PASS XDP_PASS
#define EP_DROP XDP_DROP
#define EP_TX XDP_TX

/* bytes the TC entries make linear up front: Ethernet + outer IP with our
 * option + inner IP + the longest TCP header */
#define EP_PULL_LEN (sizeof(struct ethhdr) + 28 + sizeof(struct iphdr) + 60)

static __always_inline void *ep_data(void *ctx, const int tc)
{
    if (tc)
        return (void *)(long)((struct __sk_buff *)ctx)->data;
    return (void *)(long)((struct xdp_md *)ctx)->data;
}

static __always_inline void *ep_data_end(void *ctx, const int tc)
{
    if (tc)
        return (void *)(long)((struct __sk_buff *)ctx)->data_end;
    return (void *)(long)((struct xdp_md *)ctx)->data_end;
}

/* the whole packet's length (an skb's paged part included) */
static __always_inline __u32 ep_len(void *ctx, const int tc)
{
    if (tc)
        return ((struct __sk_buff *)ctx)->len;
    return ep_data_end(ctx, 0) - ep_data(ctx, 0);
}

static __always_inline __u32 ep_ingress_ifindex(void *ctx, const int tc)
{
    if (tc)
        return ((struct __sk_buff *)ctx)->ifindex;   /* at TC ingress: the device */
    return ((struct xdp_md *)ctx)->ingress_ifindex;
}

/* TC: make the headers linear (no-op when they already are) */
static __always_inline void ep_pull_headers(struct __sk_buff *skb)
{
    __u32 linear = skb->data_end - skb->data;
    if (linear >= EP_PULL_LEN || linear >= skb->len)
        return;
    bpf_skb_pull_data(skb, skb->len < EP_PULL_LEN ? skb->len : EP_PULL_LEN);
}

static __always_inline int tc_verdict(struct __sk_buff *skb, int v)
{
    if (v == EP_PASS)
        return TC_ACT_OK;
    if (v == EP_TX)
        return bpf_redirect(skb->ifindex, 0);
    return TC_ACT_SHOT;
}

/* Rewrite a 4-byte address at addr_off and a 2-byte port at port_off of an IPv4
 * (IHL 5) + TCP packet, fixing both checksums. old_* must be what is there now.
 * XDP writes through ip and tcp, which the caller has bounds-checked (through
 * tcp + 1) and not invalidated since; TC ignores them (its helpers take offsets
 * and invalidate packet pointers) and may be given NULL. */
static __always_inline void ep_nat(void *ctx, const int tc, struct iphdr *ip, struct tcphdr *tcp,
                                   int addr_off, __u32 old_addr, __u32 new_addr,
                                   int port_off, __u16 old_port, __u16 new_port)
{
    const int ip_csum = sizeof(struct ethhdr) + offsetof(struct iphdr, check);
    const int tcp_csum = sizeof(struct ethhdr) + sizeof(struct iphdr) +
                         offsetof(struct tcphdr, check);
    if (tc) {
        struct __sk_buff *skb = ctx;
        bpf_l4_csum_replace(skb, tcp_csum, old_addr, new_addr, BPF_F_PSEUDO_HDR | 4);
        bpf_l4_csum_replace(skb, tcp_csum, old_port, new_port, 2);
        bpf_l3_csum_replace(skb, ip_csum, old_addr, new_addr, 4);
        bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0);
        bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0);
        return;
    }
    /* the address delta once, for the IP header and the TCP pseudo header */
    __u64 d = ep_csum_diff4(old_addr, new_addr);
    /* five and seven 16-bit terms: two folds are enough */
    ip->check = ep_csum_fold16((__u16)~ip->check + d);
    tcp->check = ep_csum_fold16((__u16)~tcp->check + d + (__u16)~old_port + new_port);
    if (addr_off == sizeof(struct ethhdr) + offsetof(struct iphdr, daddr))
        ip->daddr = new_addr;
    else
        ip->saddr = new_addr;
    if (port_off == sizeof(struct ethhdr) + sizeof(struct iphdr) + offsetof(struct tcphdr, dest))
        tcp->dest = new_port;
    else
        tcp->source = new_port;
}

/* Copy an Ethernet header (14 bytes) as three 32-bit words and a 16-bit one.
 * A __builtin_memcpy between packet pointers compiles to 14 single-byte loads
 * and stores (clang cannot know the alignment). The verifier accepts wider
 * packet accesses at any offset where the architecture has efficient unaligned
 * access (x86-64, what this targets; a strict-alignment one would reject the
 * program at load, not misbehave), and with XDP's 256-byte headroom the
 * addresses used here are 4-byte aligned anyway. src and dst must not overlap;
 * the caller has bounds-checked both. */
static __always_inline void ep_copy_eth(void *dst, const void *src)
{
    __u32 w0 = ((const __u32 *)src)[0], w1 = ((const __u32 *)src)[1];
    __u32 w2 = ((const __u32 *)src)[2];
    __u16 proto = ((const __u16 *)src)[6];
    ((__u32 *)dst)[0] = w0;
    ((__u32 *)dst)[1] = w1;
    ((__u32 *)dst)[2] = w2;
    ((__u16 *)dst)[6] = proto;
}

/* Drop the outer_len bytes of outer IPv4 header after Ethernet. Returns 0 or -1. */
static __always_inline int ep_decap(void *ctx, const int tc, const int outer_len)
{
    if (tc)
        return bpf_skb_adjust_room(ctx, -outer_len, BPF_ADJ_ROOM_MAC,
                                   BPF_F_ADJ_ROOM_DECAP_L3_IPV4) ? -1 : 0;
    void *data = ep_data(ctx, 0);
    void *data_end = ep_data_end(ctx, 0);
    if (data + outer_len + sizeof(struct ethhdr) > data_end)
        return -1;
    /* outer_len >= 20 > ETH_HLEN: source and destination do not overlap */
    ep_copy_eth(data + outer_len, data);
    return bpf_xdp_adjust_head(ctx, outer_len) ? -1 : 0;
}

/* Cut the packet to len bytes (len <= current length). Returns 0 or -1. */
static __always_inline int ep_trim(void *ctx, const int tc, __u32 len)
{
    __u32 cur = ep_len(ctx, tc);
    if (cur == len)
        return 0;
    if (tc)
        return bpf_skb_change_tail(ctx, len, 0) ? -1 : 0;
    return bpf_xdp_adjust_tail(ctx, (int)len - (int)cur) ? -1 : 0;
}

#endif
