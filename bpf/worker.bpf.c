/* worker.bpf.c - the worker end of the backhaul.
 *
 * worker_ingress (XDP) / worker_ingress_tc (TC clsact ingress), one core, on the
 *   edge-facing interfaces: an IPIP packet from an edge to
 *   this worker -> remember how to send the reply back (VIP:port from our outer
 *   option, the edge, the interface, the L2 addresses) -> decapsulate -> the
 *   kernel delivers the inner packet to the machine address (local here).
 * worker_egress (TC egress, the same interfaces): a TCP packet from a machine to
 *   a client we remembered -> reverse-NAT the source to VIP:port -> IPIP to the
 *   edge -> redirect out of the interface the flow came in on.
 * Everything else passes untouched.
 */
#define EDGEPROXY_WORKER 1

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>

#include "edgeproxy_maps.h"
#include "csum_helpers.h"
#include "pckt_parsing.h"
#include "pckt_encap.h"

static __always_inline void wstat_inc(__u32 idx)
{
    u64 *v = worker_stats.lookup(&idx);
    if (v)
        *v += 1;
}

/* the route part of the value (WF_ROUTE_WORDS words, 4-byte aligned both sides) */
static __always_inline int flow_route_equal(struct worker_flow_value *a,
                                            struct worker_flow_value *b)
{
    __u32 *x = (__u32 *)a, *y = (__u32 *)b;
#pragma unroll
    for (int i = 0; i < WF_ROUTE_WORDS; i++)
        if (x[i] != y[i])
            return 0;
    return 1;
}

static __always_inline int flow_closed(__u64 f)
{
    return (f & WF_RST) || (f & (WF_FIN_IN | WF_FIN_OUT)) == (WF_FIN_IN | WF_FIN_OUT);
}

/* FIN/RST of one direction; the bits only ever get set, with fetch_or */
static __always_inline void flow_track_close(struct worker_flow_value *f, __u8 flags,
                                             __u64 fin_bit)
{
    __u64 bit = (flags & TCP_FLAG_RST) ? WF_RST : (flags & TCP_FLAG_FIN) ? fin_bit : 0;
    if (bit && !(f->flags & bit))
        __sync_fetch_and_or(&f->flags, bit);
}

/* One core for both entries (pckt_ctx.h): XDP (tc = 0) and TC ingress (tc = 1) */
static __always_inline int worker_ingress_core(void *ctx, const int tc)
{
    void *data = ep_data(ctx, tc);
    void *data_end = ep_data_end(ctx, tc);
    wstat_inc(WSTAT_PACKETS);

    struct ethhdr *eth = data;
    struct iphdr *outer = (void *)(eth + 1);
    if ((void *)(outer + 1) > data_end || eth_proto(eth) != bpf_htons(ETH_P_IP) ||
        outer->protocol != IPPROTO_IPIP)
        return EP_PASS;
    __u32 zero = 0;
    struct dp_config *cfg = config.lookup(&zero);
    if (!cfg || outer->daddr != cfg->host_addr)
        return EP_PASS;

    /* ours only with our option and a plain inner TCP header */
    __u8 *opt = (void *)(outer + 1);
    struct iphdr *inner = (void *)outer + OUTER_LEN_EDGE;
    struct tcphdr *tcp = (void *)(inner + 1);
    if ((void *)(tcp + 1) > data_end || outer->ihl * 4 != OUTER_LEN_EDGE ||
        ip_is_fragment(outer) || opt[0] != EP_IPOPT_TYPE || opt[1] != EP_IPOPT_LEN ||
        inner->version != 4 || inner->ihl != 5 || inner->protocol != IPPROTO_TCP) {
        wstat_inc(WSTAT_BAD_IPIP);
        return EP_PASS;
    }

    struct worker_flow_key key = {.machine_addr = inner->daddr, .client_addr = inner->saddr,
                                  .machine_port = tcp->dest, .client_port = tcp->source};
    struct worker_flow_value val = {.edge = outer->saddr,
                                    .ifindex = ep_ingress_ifindex(ctx, tc)};
    __builtin_memcpy(&val.vport, opt + 2, sizeof(val.vport));
    __builtin_memcpy(&val.vip, opt + 4, sizeof(val.vip));
    __builtin_memcpy(val.edge_mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(val.local_mac, eth->h_dest, ETH_ALEN);
    __u8 flags = tcp_flags(tcp);
    int syn = (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
    /* write only on change: one lookup per packet, one update per flow */
    struct worker_flow_value *cur = worker_flows.lookup(&key);
    if (cur && flow_closed(cur->flags)) {
        /* a closed flow: a new SYN starts a new one; anything else is the close's
         * tail (last ACK, retransmitted FIN) and must not revive it */
        if (syn)
            worker_flows.update(&key, &val);
    } else if (cur) {
        if (!flow_route_equal(cur, &val)) {
            val.flags = cur->flags;
            worker_flows.update(&key, &val);
            cur = worker_flows.lookup(&key);
        }
        if (cur)
            flow_track_close(cur, flags, WF_FIN_IN);
    } else if (!(flags & TCP_FLAG_RST)) {
        /* first packet we see of this flow (a SYN, or mid-flow after a restart) */
        if (flags & TCP_FLAG_FIN)
            val.flags = WF_FIN_IN;
        worker_flows.update(&key, &val);
    }

    if (ep_decap(ctx, tc, OUTER_LEN_EDGE)) {
        wstat_inc(WSTAT_HEADROOM);
        return EP_DROP;
    }
    wstat_inc(WSTAT_DECAP);
    return EP_PASS;
}

int worker_ingress(struct xdp_md *ctx)
{
    return worker_ingress_core(ctx, 0);
}

/* TC clsact ingress, direct action: GSO super-packets are decapsulated whole */
int worker_ingress_tc(struct __sk_buff *skb)
{
    ep_pull_headers(skb);
    return tc_verdict(skb, worker_ingress_core(skb, 1));
}

#define IP_CSUM_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, check))
#define IP_SRC_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, saddr))
#define TCP_OFF (sizeof(struct ethhdr) + sizeof(struct iphdr))
#define TCP_CSUM_OFF (TCP_OFF + offsetof(struct tcphdr, check))
#define TCP_SPORT_OFF (TCP_OFF + offsetof(struct tcphdr, source))

int worker_egress(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct tcphdr *tcp = (void *)(ip + 1);
    if ((void *)(tcp + 1) > data_end) {
        /* headers may sit in a non-linear part: pull them once and retry */
        if (bpf_skb_pull_data(skb, TCP_OFF + sizeof(struct tcphdr)))
            return TC_ACT_OK;
        data = (void *)(long)skb->data;
        data_end = (void *)(long)skb->data_end;
        eth = data;
        ip = (void *)(eth + 1);
        tcp = (void *)(ip + 1);
        if ((void *)(tcp + 1) > data_end)
            return TC_ACT_OK;
    }
    if (eth_proto(eth) != bpf_htons(ETH_P_IP) || ip->ihl != 5 ||
        ip->protocol != IPPROTO_TCP || ip_is_fragment(ip))
        return TC_ACT_OK;

    struct worker_flow_key key = {.machine_addr = ip->saddr, .client_addr = ip->daddr,
                                  .machine_port = tcp->source, .client_port = tcp->dest};
    struct worker_flow_value *f = worker_flows.lookup(&key);
    if (!f)
        return TC_ACT_OK;
    __u8 flags = tcp_flags(tcp);
    if (flow_closed(f->flags)) {
        /* the flow through the edge is over. A SYN(-ACK) now belongs to a new
         * connection on the same tuple that did not come through us (e.g. routed
         * directly): forget the entry and leave the packet alone. */
        if (flags & TCP_FLAG_SYN) {
            worker_flows.delete(&key);
            return TC_ACT_OK;
        }
    } else {
        flow_track_close(f, flags, WF_FIN_OUT);
    }
    struct worker_flow_value fv = *f;
    __u32 old_addr = ip->saddr;
    __u16 old_port = tcp->source;
    __u16 inner_len = bpf_ntohs(ip->tot_len);
    __u8 tos = ip->tos;
    __u16 df = ip->frag_off & bpf_htons(IP_DF);

    /* reverse NAT; the helpers keep CHECKSUM_PARTIAL skbs right (pseudo header only) */
    ep_nat(skb, 1, NULL, NULL, IP_SRC_OFF, old_addr, fv.vip, TCP_SPORT_OFF, old_port, fv.vport);

    __u32 zero = 0;
    struct dp_config *cfg = config.lookup(&zero);
    if (!cfg)
        return TC_ACT_SHOT;
    if (skb_encap_to_edge(skb, cfg->host_addr, fv.edge, inner_len, tos, df,
                          fv.local_mac, fv.edge_mac)) {
        wstat_inc(WSTAT_HEADROOM);
        return TC_ACT_SHOT;
    }
    wstat_inc(WSTAT_REPLIES);
    return bpf_redirect(fv.ifindex, 0);
}
