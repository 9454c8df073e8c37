/* pckt_encap.h - IPIP encapsulation and decapsulation, XDP and TC flavours.
 *
 * Edge -> worker packets carry an 8-byte experimental IPv4 option on the OUTER
 * header (EP_IPOPT_TYPE) holding the original VIP:port, because the inner packet
 * is already DNATed to the machine and the worker needs the VIP to reverse-NAT
 * the reply. Worker -> edge packets are plain IPIP (their inner src is the VIP). */
#ifndef EDGEPROXY_PCKT_ENCAP_H
#define EDGEPROXY_PCKT_ENCAP_H

#include "csum_helpers.h"
#include "pckt_parsing.h"

#define OUTER_LEN_EDGE (sizeof(struct iphdr) + EP_IPOPT_LEN)   /* 28: IHL 7 */
#define OUTER_LEN_PLAIN (sizeof(struct iphdr))                 /* 20: IHL 5 */

/* XDP: put an outer IPv4 header with our option between Ethernet and the inner
 * IPv4 header. Returns 0 or -1 (no headroom). */
static __always_inline int xdp_encap_to_worker(struct xdp_md *ctx, __u32 saddr, __u32 daddr,
                                               __u32 vip, __u16 vport)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct iphdr *inner = data + sizeof(struct ethhdr);
    if ((void *)(inner + 1) > data_end)
        return -1;
    __u16 outer_len = bpf_htons(bpf_ntohs(inner->tot_len) + OUTER_LEN_EDGE);
    __u8 tos = inner->tos;
    __u16 df = inner->frag_off & bpf_htons(IP_DF);

    if (bpf_xdp_adjust_head(ctx, -(int)OUTER_LEN_EDGE))
        return -1;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *outer = data + sizeof(struct ethhdr);
    /* the old Ethernet header now starts OUTER_LEN_EDGE bytes in; this bound
     * covers it, the new one and the outer header (verifier) */
    if (data + sizeof(struct ethhdr) + OUTER_LEN_EDGE > data_end)
        return -1;
    __builtin_memcpy(eth, data + OUTER_LEN_EDGE, sizeof(struct ethhdr));

    outer->version = 4;
    outer->ihl = OUTER_LEN_EDGE / 4;
    outer->tos = tos;
    outer->tot_len = outer_len;
    outer->id = 0;
    outer->frag_off = df;
    outer->ttl = DEFAULT_TTL;
    outer->protocol = IPPROTO_IPIP;
    outer->check = 0;
    outer->saddr = saddr;
    outer->daddr = daddr;
    __u8 *opt = (void *)(outer + 1);
    opt[0] = EP_IPOPT_TYPE;
    opt[1] = EP_IPOPT_LEN;
    __builtin_memcpy(opt + 2, &vport, sizeof(vport));
    __builtin_memcpy(opt + 4, &vip, sizeof(vip));
    outer->check = ep_csum_fold(ep_csum_add_words(0, (__u16 *)outer, OUTER_LEN_EDGE / 2));
    return 0;
}

/* XDP: drop the outer_len bytes of outer IPv4 header after Ethernet, keeping
 * the Ethernet header. Returns 0 or -1. */
static __always_inline int xdp_decap(struct xdp_md *ctx, const int outer_len)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (data + outer_len + sizeof(struct ethhdr) > data_end)
        return -1;
    /* outer_len >= 20 > ETH_HLEN: source and destination do not overlap */
    __builtin_memcpy(data + outer_len, data, sizeof(struct ethhdr));
    if (bpf_xdp_adjust_head(ctx, outer_len))
        return -1;
    return 0;
}

/* TC: grow room for a plain outer IPv4 header and write it plus Ethernet.
 * BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 tells GSO the skb is now IPIP. */
static __always_inline int skb_encap_to_edge(struct __sk_buff *skb, __u32 saddr, __u32 daddr,
                                             __u16 inner_len, __u8 tos, __u16 df,
                                             const __u8 *src_mac, const __u8 *dst_mac)
{
    if (bpf_skb_adjust_room(skb, sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
                            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
        return -1;
    struct iphdr outer = {};
    outer.version = 4;
    outer.ihl = 5;
    outer.tos = tos;
    outer.tot_len = bpf_htons(inner_len + sizeof(struct iphdr));
    outer.frag_off = df;
    outer.ttl = DEFAULT_TTL;
    outer.protocol = IPPROTO_IPIP;
    outer.saddr = saddr;
    outer.daddr = daddr;
    outer.check = ep_csum_fold(ep_csum_add_words(0, (__u16 *)&outer, sizeof(outer) / 2));
    struct ethhdr eth = {};
    __builtin_memcpy(eth.h_dest, dst_mac, ETH_ALEN);
    __builtin_memcpy(eth.h_source, src_mac, ETH_ALEN);
    eth.h_proto = bpf_htons(ETH_P_IP);
    if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &outer, sizeof(outer), 0))
        return -1;
    if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0))
        return -1;
    return 0;
}

#endif
