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
#include "pckt_ctx.h"

#define OUTER_LEN_EDGE (sizeof(struct iphdr) + EP_IPOPT_LEN)   /* 28: IHL 7 */
#define OUTER_LEN_PLAIN (sizeof(struct iphdr))                 /* 20: IHL 5 */

/* Put an outer IPv4 header with our option between Ethernet and the inner IPv4
 * header (XDP: adjust_head; TC: adjust_room with ENCAP_L3_IPV4, GSO kept whole:
 * the kernel marks the skb IPXIP4 and lowers gso_size by the 28 bytes, and GSO
 * copies the outer header, option included, into every segment if it must cut).
 * The inner header's tot_len (network order), tos and DF bit come from the
 * caller, which has read them already: nothing of the inner packet is re-read.
 * Returns 0 or -1 (no headroom). */
static __always_inline int ep_encap_to_worker(void *ctx, const int tc, __u16 inner_len,
                                              __u8 tos, __u16 df, __u32 saddr,
                                              __u32 daddr, __u32 vip, __u16 vport)
{
    __u16 outer_len = bpf_htons(bpf_ntohs(inner_len) + OUTER_LEN_EDGE);
    void *data, *data_end;
    if (tc) {
        if (bpf_skb_adjust_room(ctx, OUTER_LEN_EDGE, BPF_ADJ_ROOM_MAC,
                                BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
            return -1;
    } else if (bpf_xdp_adjust_head(ctx, -(int)OUTER_LEN_EDGE)) {
        return -1;
    }
    data = ep_data(ctx, tc);
    data_end = ep_data_end(ctx, tc);
    /* one check for both the Ethernet move (XDP: the old header now starts 28
     * bytes in) and the outer header's words; the verifier needs it after the
     * adjust, which invalidated every packet pointer */
    if (data + sizeof(struct ethhdr) + OUTER_LEN_EDGE > data_end)
        return -1;
    if (!tc)
        ep_copy_eth(data, data + OUTER_LEN_EDGE);
    struct iphdr *outer = data + sizeof(struct ethhdr);
    /* seven 32-bit words written from registers; the header checksum is summed
     * from the same values (a one's-complement sum of 32-bit words folds to the
     * sum of their 16-bit halves), not read back from the packet */
    __u32 w0 = bpf_htonl((0x47 << 24) | (tos << 16)) | ((__u32)outer_len << 16);
    __u32 w1 = (__u32)df << 16;                      /* id 0, frag_off = DF */
    __u32 w2 = bpf_htonl((DEFAULT_TTL << 24) | (IPPROTO_IPIP << 16));   /* check 0 */
    __u32 w5 = bpf_htonl((EP_IPOPT_TYPE << 24) | (EP_IPOPT_LEN << 16)) | ((__u32)vport << 16);
    __u64 sum = (__u64)w0 + w1 + w2 + saddr + daddr + w5 + vip;
    w2 |= (__u32)ep_csum_fold(sum) << 16;
    __u32 *w = (void *)outer;
    w[0] = w0;
    w[1] = w1;
    w[2] = w2;
    w[3] = saddr;
    w[4] = daddr;
    w[5] = w5;
    w[6] = vip;
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
