/* edge.bpf.c - XDP fast path of an edge host.
 *
 * Two entry points share one core (pckt_ctx.h): edge_xdp (XDP) and edge_tc (TC
 * clsact ingress, direct action; GSO super-packets stay whole).
 * Read top to bottom as a packet's life:
 *   count -> parse -> (IPIP reply from a worker? -> edge_return)
 *   -> raw-TCP (VIP, port)? -> conntrack hit, or choose a machine for a SYN
 *   -> DNAT to machine:internal_port -> IPIP to the machine's worker -> PASS
 * The kernel routes the outer packet to the worker (ip_forward on the edge).
 * Everything that is not ours goes to the kernel untouched.
 */
#define EDGEPROXY_EDGE 1

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
#include "flow_hash.h"

#define IP_DST_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, daddr))
#define TCP_DPORT_OFF (sizeof(struct ethhdr) + sizeof(struct iphdr) + offsetof(struct tcphdr, dest))

/* ---------------------------------------------------------------- counters */

static __always_inline void stat_inc(__u32 idx)
{
    u64 *v = edge_stats.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline void anomaly_inc(__u32 kind)
{
    u64 *v = anomalies.lookup(&kind);
    if (v)
        *v += 1;
}

static __always_inline int pass(void)
{
    stat_inc(STAT_PASSED);
    return XDP_PASS;
}

static __always_inline int drop(void)
{
    stat_inc(STAT_DROPPED);
    return XDP_DROP;
}

/* The VIP pre-filter: 0 means daddr is certainly not a raw-TCP VIP. The loader
 * sets a VIP's bit before its first services entry exists and clears it only
 * after its last one is gone, so a VIP never reads 0; other addresses may read
 * 1 (a shared bit) and take the services lookup as before. An array lookup with
 * a constant index bound is inlined by the verifier: a load, no hashing of a key. */
static __always_inline int maybe_vip(__u32 daddr)
{
    __u32 bit = vip_filter_bit(daddr), word = bit / 64;
    u64 *w = vip_filter.lookup(&word);
    return !w || ((*w >> (bit % 64)) & 1);
}

/* The key epoch of (daddr, dport)'s bucket; 0 if the map has no such slot */
static __always_inline __u32 key_epoch_of(__u32 daddr, __u16 dport)
{
    __u32 slot = key_epoch_slot(daddr, dport);
    u32 *e = key_epoch.lookup(&slot);
    return e ? *e : 0;
}

/* An odd-shaped packet is our business only when it is addressed to a raw-TCP
 * VIP (the (vip, 0) marker entry): then count it and apply the verdict;
 * anything else goes to the kernel as if we were not here. */
static __always_inline int vip_anomaly(__u32 daddr, __u32 kind, int verdict)
{
    struct service_key key = {.addr = daddr, .port = 0, .proto = IPPROTO_TCP};
    if (!services.lookup(&key))
        return pass();
    anomaly_inc(kind);
    return verdict == XDP_DROP ? drop() : pass();
}

/* opened: this packet created the flow (one lookup of the machine's per-CPU
 * counters for the SYN's opened and packet counts, not two) */
static __always_inline void count_packet(__u32 machine, __u32 payload, int out, int opened)
{
    struct machine_stats *s = machine_stats.lookup(&machine);
    if (!s)
        return;
    if (opened)
        s->opened += 1;
    if (out) {
        s->packets_out += 1;
        s->bytes_out += payload;
    } else {
        s->packets_in += 1;
        s->bytes_in += payload;
    }
}

/* ---------------------------------------------------- connection accounting */

/* The datapath's clock: CLOCK_MONOTONIC at the last tick (same base as
 * bpf_ktime_get_ns() and the control plane's time.monotonic_ns(), at most one
 * tick behind). A few loads instead of a clocksource read: bpf_ktime_get_ns()
 * cost about 25 ns per packet here (kvm guest, tsc). */
static __always_inline __u64 ep_now(void)
{
    return bpf_ktime_get_coarse_ns();
}

/* Refresh a flow's last_seen, but write the shared conntrack line only when the
 * stored value is LAST_SEEN_GRAIN_NS old: an established packet then reads the
 * entry and writes nothing to it (no cache-line bouncing between CPUs serving
 * the two directions). Idle times are therefore known to within the grain. */
static __always_inline void touch_flow(struct ct_value *ct)
{
    __u64 now = ep_now();
    if (now - ct->last_seen_ns >= LAST_SEEN_GRAIN_NS)
        ct->last_seen_ns = now;
}

/* A flow's own packet and byte counts. Under XDP a device queue's frames are
 * handled by one NAPI poll at a time, so a flow's direction is never on two CPUs
 * at once and plain adds are exact. Under TC a veth delivers each frame on the
 * sending CPU's backlog, so one direction of one flow can run on two CPUs at
 * once and plain adds lose increments: there the adds are atomic. `tc` is a
 * compile-time constant of each entry point, so XDP pays nothing. */
static __always_inline void count_flow(__u64 *packets, __u64 *bytes, __u32 payload,
                                       const int tc)
{
    if (tc) {
        __sync_fetch_and_add(packets, 1);
        __sync_fetch_and_add(bytes, payload);
    } else {
        *packets += 1;
        *bytes += payload;
    }
}

/* Take one live-connection slot on a machine unless it is at the limit. The
 * add-then-check keeps the count exact when two CPUs race for the last slot. */
static __always_inline int reserve(__u32 machine, __u32 limit)
{
    u64 *active = machine_active.lookup(&machine);
    if (!active)
        return -1;
    u64 before = __sync_fetch_and_add(active, 1);
    if (limit && before >= limit) {
        __sync_fetch_and_add(active, -1);
        return -1;
    }
    return 0;
}

static __always_inline void release(__u32 machine)
{
    u64 *active = machine_active.lookup(&machine);
    if (active)
        __sync_fetch_and_add(active, -1);
}

/* Mark a flow closed. fetch_or makes exactly one caller (either direction's
 * packet on any CPU, or the sweep) see CT_CLOSED clear and do the decrement. */
static __always_inline void close_flow(struct ct_value *ct, __u64 how)
{
    u64 old = __sync_fetch_and_or(&ct->flags, CT_CLOSED | how);
    if (old & CT_CLOSED)
        return;
    __u32 machine = ct->machine;
    release(machine);
    struct machine_stats *s = machine_stats.lookup(&machine);
    if (s) {
        if (how & CT_RST)
            s->reset += 1;
        else
            s->closed += 1;
    }
}

/* FIN/RST tracking; fin_bit is this direction's CT_FIN_* bit */
static __always_inline void track_close(struct ct_value *ct, __u8 flags, __u64 fin_bit)
{
    if (flags & TCP_FLAG_RST) {
        close_flow(ct, CT_RST);
        return;
    }
    if (!(flags & TCP_FLAG_FIN) || (ct->flags & fin_bit))
        return;
    u64 old = __sync_fetch_and_or(&ct->flags, fin_bit);
    u64 other = fin_bit == CT_FIN_IN ? CT_FIN_OUT : CT_FIN_IN;
    /* whoever sets the second FIN closes the flow */
    if (!(old & fin_bit) && (old & other))
        close_flow(ct, 0);
}

/* ------------------------------------------------------ choosing a machine */

static __always_inline int pick_machine(struct service_value *svc, __u32 hash, __u32 *out)
{
    __u32 id = svc->id, gen = svc->gen, size = svc->maglev_size;
    __u32 count = svc->backend_count, limit = svc->hard_limit;

    /* 1. the Maglev table of the nearest tier */
    if (size) {
        struct maglev_key mk = {.service = id, .gen = gen, .slot = hash % size};
        u32 *m = maglev.lookup(&mk);
        if (m && reserve(*m, limit) == 0) {
            *out = *m;
            return 0;
        }
    }
    /* 2. it is full: every backend in tier order, starting at a hash offset
     *    inside each tier. MAX_SCAN bounds the loop for the verifier. */
    for (__u32 i = 0; i < MAX_SCAN; i++) {
        if (i >= count)
            break;
        struct backend_key bk = {.service = id, .gen = gen, .index = i};
        struct backend_value *b = backends.lookup(&bk);
        if (!b || !b->tier_len)
            return -1;
        bk.index = b->tier_start + (hash + i - b->tier_start) % b->tier_len;
        b = backends.lookup(&bk);
        if (b && reserve(b->machine, limit) == 0) {
            *out = b->machine;
            return 0;
        }
    }
    return -1;
}

/* Mid-flow packet without conntrack: the machine Maglev says, no capacity check */
static __always_inline int resteer_machine(struct service_value *svc, __u32 hash, __u32 *out)
{
    if (!svc->maglev_size)
        return -1;
    struct maglev_key mk = {.service = svc->id, .gen = svc->gen, .slot = hash % svc->maglev_size};
    u32 *m = maglev.lookup(&mk);
    if (!m)
        return -1;
    *out = *m;
    return 0;
}

/* Katran-style flood guard: new flows per CPU per one-second window */
static __always_inline int flood_exceeded(struct dp_config *cfg)
{
    __u32 cap = cfg->flood_cap, zero = 0;
    if (!cap)
        return 0;
    struct flood_state *st = flood.lookup(&zero);
    if (!st)
        return 0;
    u64 now = ep_now();
    if (now - st->window_start_ns >= EP_NSEC_PER_SEC) {
        st->window_start_ns = now;
        st->count = 0;
    }
    st->count += 1;
    return st->count > cap;
}

/* ------------------------------------------------------------- verdicts */

/* Answer a SYN (no ACK) with RST|ACK built in place, sent back out with XDP_TX:
 * addresses and ports swapped, seq 0, ack = SYN's seq + 1 + payload, no options. */
static __always_inline int send_rst(void *ctx, const int tc, __u32 payload)
{
    void *data = ep_data(ctx, tc);
    void *data_end = ep_data_end(ctx, tc);
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct tcphdr *tcp = (void *)(ip + 1);
    if ((void *)(tcp + 1) > data_end)
        return drop();

    __u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

    __u32 addr = ip->saddr;
    ip->saddr = ip->daddr;
    ip->daddr = addr;
    ip->tos = 0;
    ip->tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct tcphdr));
    ip->id = 0;
    ip->frag_off = bpf_htons(IP_DF);
    ip->ttl = DEFAULT_TTL;
    ip->check = 0;
    ip->check = ep_csum_fold(ep_csum_add_words(0, (__u16 *)ip, sizeof(struct iphdr) / 2));

    __u16 port = tcp->source;
    tcp->source = tcp->dest;
    tcp->dest = port;
    tcp->ack_seq = bpf_htonl(bpf_ntohl(tcp->seq) + payload + 1); /* SYN counts one */
    tcp->seq = 0;
    ((__u8 *)tcp)[12] = (sizeof(struct tcphdr) / 4) << 4;       /* data offset 5 */
    ((__u8 *)tcp)[13] = TCP_FLAG_RST | TCP_FLAG_ACK;
    tcp->window = 0;
    tcp->urg_ptr = 0;
    tcp->check = 0;
    __u64 sum = (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) +
                (ip->daddr >> 16) + bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(struct tcphdr));
    tcp->check = ep_csum_fold(ep_csum_add_words(sum, (__u16 *)tcp, sizeof(struct tcphdr) / 2));

    if (ep_trim(ctx, tc, sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct tcphdr))) {
        anomaly_inc(ANOM_HEADROOM);
        return drop();
    }
    stat_inc(STAT_RST_SENT);
    return XDP_TX;
}

/* No machine for a new flow (full, flood cap): RST or drop, per config */
static __always_inline int refuse(void *ctx, const int tc, struct dp_config *cfg,
                                  struct service_stats *ss, __u32 payload)
{
    if (cfg->flags & CFG_REFUSE_RST) {
        if (ss)
            ss->refused += 1;
        return send_rst(ctx, tc, payload);
    }
    if (ss)
        ss->dropped += 1;
    return drop();
}

/* DNAT the inner packet to machine:internal_port, then IPIP it to the worker.
 * ip and tcp are the headers edge_forward() checked (through tcp + 1); nothing
 * since then changed the packet, so they are still valid for the verifier. */
static __always_inline int forward(void *ctx, const int tc, struct dp_config *cfg,
                                   __u32 machine, struct iphdr *ip, struct tcphdr *tcp)
{
    struct machine_value *m = machines.lookup(&machine);
    if (!m || !(m->flags & MACHINE_F_IN_USE)) {
        anomaly_inc(ANOM_BAD_MACHINE);
        return drop();
    }
    __u32 maddr = m->addr, worker = m->worker;
    __u16 mport = m->port;

    __u32 vip = ip->daddr;
    __u16 vport = tcp->dest;
    /* what the outer header copies from the inner one, read before any rewrite */
    __u16 inner_len = ip->tot_len;
    __u8 tos = ip->tos;
    __u16 df = ip->frag_off & bpf_htons(IP_DF);
    ep_nat(ctx, tc, ip, tcp, IP_DST_OFF, vip, maddr, TCP_DPORT_OFF, vport, mport);

    if (ep_encap_to_worker(ctx, tc, inner_len, tos, df, cfg->host_addr, worker, vip, vport)) {
        anomaly_inc(ANOM_HEADROOM);
        return drop();
    }
    stat_inc(STAT_FORWARDED);
    return EP_PASS;
}

/* ------------------------------------------------- worker -> edge replies */

static __always_inline int edge_return(void *ctx, const int tc)
{
    void *data = ep_data(ctx, tc);
    void *data_end = ep_data_end(ctx, tc);
    struct iphdr *outer = data + sizeof(struct ethhdr);
    struct iphdr *inner = (void *)(outer + 1);
    if ((void *)(inner + 1) > data_end || outer->ihl != 5 || ip_is_fragment(outer) ||
        inner->version != 4 || inner->ihl != 5 || inner->protocol != IPPROTO_TCP ||
        ip_is_fragment(inner) ||
        sizeof(struct ethhdr) + OUTER_LEN_PLAIN + bpf_ntohs(inner->tot_len) > ep_len(ctx, tc)) {
        anomaly_inc(ANOM_BAD_IPIP);
        return pass();
    }
    struct tcphdr *tcp = (void *)(inner + 1);
    __u32 payload = 0;
    if (tcp_check(inner, tcp, data_end, &payload) != TCP_OK) {
        anomaly_inc(ANOM_BAD_IPIP);
        return pass();
    }
    /* only replies from a raw-TCP service of ours are decapsulated: a flow whose
     * key epoch is still current proves it (as in edge_forward), else services */
    struct ct_key ck = {.saddr = inner->daddr, .daddr = inner->saddr,
                        .sport = tcp->dest, .dport = tcp->source};
    __u32 epoch = key_epoch_of(ck.daddr, ck.dport);
    struct ct_value *ct = conntrack.lookup(&ck);
    if (!ct || (__u32)(ct->flags >> CT_EPOCH_SHIFT) != epoch) {
        struct service_key sk = {.addr = inner->saddr, .port = tcp->source,
                                 .proto = IPPROTO_TCP};
        struct service_value *svc = services.lookup(&sk);
        if (!svc || (svc->flags & SVC_F_VIP_MARKER)) {
            anomaly_inc(ANOM_BAD_IPIP);
            return pass();
        }
    }
    if (ct) {
        touch_flow(ct);
        count_flow(&ct->packets_out, &ct->bytes_out, payload, tc);
        count_packet(ct->machine, payload, 1, 0);
        track_close(ct, tcp_flags(tcp), CT_FIN_OUT);
    } else {
        anomaly_inc(ANOM_RETURN_NO_CT);
    }
    if (ep_decap(ctx, tc, OUTER_LEN_PLAIN)) {
        anomaly_inc(ANOM_HEADROOM);
        return drop();
    }
    stat_inc(STAT_RETURNED);
    return EP_PASS;
}

/* ---------------------------------------------------- client -> VIP packets */

/* A SYN without a live conntrack entry: flood guard, choose a machine, record
 * the flow. Returns -1 with *machine set to forward to it (and *opened set when
 * this packet created the flow), or a final verdict. */
static __always_inline int new_flow(void *ctx, const int tc, struct dp_config *cfg,
                                    struct service_value *svc, struct ct_key *ck, int reuse,
                                    __u32 payload, __u32 epoch, __u32 *machine, int *opened)
{
    __u32 svc_id = svc->id;
    /* per-service counters only on these rarer outcomes: no lookup otherwise */
    if (flood_exceeded(cfg)) {
        anomaly_inc(ANOM_FLOOD);
        struct service_stats *ss = service_stats.lookup(&svc_id);
        if (ss)
            ss->flood += 1;
        return refuse(ctx, tc, cfg, ss, payload);
    }
    __u32 hash = flow_hash(ck->saddr, ck->daddr, ck->sport, ck->dport);
    if (pick_machine(svc, hash, machine)) {
        anomaly_inc(ANOM_NO_BACKEND);
        struct service_stats *ss = service_stats.lookup(&svc_id);
        if (ss)
            ss->no_backend += 1;
        return refuse(ctx, tc, cfg, ss, payload);
    }
    __u64 now = ep_now();
    struct ct_value nv = {.flags = (__u64)epoch << CT_EPOCH_SHIFT, .last_seen_ns = now,
                          .machine = *machine, .service = svc_id, .created_ns = now,
                          .packets_in = 1, .bytes_in = payload};
    if (reuse) {
        conntrack.update(ck, &nv);
    } else if (conntrack.insert(ck, &nv)) {
        /* another CPU created this flow a moment ago: give the slot back, follow it */
        release(*machine);
        struct ct_value *ct = conntrack.lookup(ck);
        if (!ct)
            return drop();
        *machine = ct->machine;
        return -1;
    }
    *opened = 1;   /* counted with the packet, in count_packet() */
    return -1;
}

/* ip: an IPv4 header edge_core() checked (in bounds, version 4, IHL >= 5,
 * total length within the packet); data_end from the same read of the context */
static __always_inline int edge_forward(void *ctx, const int tc, struct dp_config *cfg,
                                        struct iphdr *ip, void *data_end)
{
    if (ip->ihl != 5)
        return vip_anomaly(ip->daddr, ANOM_IP_OPTIONS, XDP_DROP);
    if (ip_is_fragment(ip))
        return vip_anomaly(ip->daddr, ANOM_FRAGMENT, XDP_DROP);
    if (ip->protocol != IPPROTO_TCP)
        return vip_anomaly(ip->daddr, ANOM_NON_TCP_VIP, XDP_PASS);

    /* tcp_check()'s steps written out, so the one bounds check of tcp + 1 is
     * the one every later access (here and in forward()) is proved by */
    struct tcphdr *tcp = (void *)(ip + 1);
    if ((void *)(tcp + 1) > data_end)
        return vip_anomaly(ip->daddr, ANOM_TRUNC_TCP, XDP_DROP);
    __u32 ip_len = bpf_ntohs(ip->tot_len);
    __u32 doff = tcp->doff * 4;
    if (doff < sizeof(struct tcphdr) || ip_len < sizeof(struct iphdr) + doff)
        return vip_anomaly(ip->daddr, ANOM_BAD_DOFF, XDP_DROP);
    if ((void *)tcp + doff > data_end)
        return vip_anomaly(ip->daddr, ANOM_TRUNC_TCP, XDP_DROP);
    __u32 payload = ip_len - sizeof(struct iphdr) - doff;

    __u8 flags = tcp_flags(tcp);
    struct ct_key ck = {.saddr = ip->saddr, .daddr = ip->daddr,
                        .sport = tcp->source, .dport = tcp->dest};
    /* Read before the services lookup: a flow created with this epoch saw its
     * key in services no earlier than the epoch was current (see below). */
    __u32 epoch = key_epoch_of(ck.daddr, ck.dport);
    struct ct_value *ct = NULL;
    __u32 machine = 0;
    int opened = 0;
    if (!(flags & TCP_FLAG_SYN)) {
        /* Established fast path, conntrack first: the entry's epoch still being
         * the bucket's means no services key of the bucket, so not (daddr, dport),
         * was deleted since the flow began, so the services lookup would hit and
         * is skipped. Otherwise (or on a miss) the full path below decides. */
        ct = conntrack.lookup(&ck);
        if (ct && (__u32)(ct->flags >> CT_EPOCH_SHIFT) == epoch)
            goto stick;   /* one forward() site for every path: less code */
    }

    /* the service: HTTP services and unknown ports are not in the map */
    struct service_key sk = {.addr = ip->daddr, .port = tcp->dest, .proto = IPPROTO_TCP};
    struct service_value *svc = services.lookup(&sk);
    if (!svc || (svc->flags & SVC_F_VIP_MARKER))
        return pass();

    if ((flags & TCP_FLAG_SYN) && (flags & (TCP_FLAG_FIN | TCP_FLAG_RST))) {
        anomaly_inc(ANOM_BAD_FLAGS);
        return drop();
    }
    int new_syn = (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
    __u32 svc_id = svc->id;

    if (flags & TCP_FLAG_SYN)
        ct = conntrack.lookup(&ck);
    int reuse = 0;
    if (ct && new_syn && (ct->flags & CT_CLOSED)) {
        /* SYN on a closed tuple starts a new flow; one CPU claims the entry.
         * A loser (or a tuple the sweep is removing) drops: the client retries. */
        u64 f = ct->flags;
        if ((f & CT_REUSED) || __sync_val_compare_and_swap(&ct->flags, f, f | CT_REUSED) != f)
            return drop();
        reuse = 1;
        ct = NULL;
    }

    if (ct) {
        /* established (or a retransmitted SYN): stick to the flow's machine */
stick:
        machine = ct->machine;
        touch_flow(ct);
        count_flow(&ct->packets_in, &ct->bytes_in, payload, tc);
        track_close(ct, flags, CT_FIN_IN);
    } else if (!new_syn) {
        /* mid-flow packet without conntrack */
        anomaly_inc(ANOM_CT_MISS);
        if (!(cfg->flags & CFG_RESTEER) ||
            resteer_machine(svc, flow_hash(ck.saddr, ck.daddr, ck.sport, ck.dport), &machine))
            return drop();
        struct service_stats *ss = service_stats.lookup(&svc_id);
        if (ss)
            ss->resteered += 1;
    } else {
        int verdict = new_flow(ctx, tc, cfg, svc, &ck, reuse, payload, epoch, &machine,
                               &opened);
        if (verdict >= 0)
            return verdict;
    }
    count_packet(machine, payload, 0, opened);
    return forward(ctx, tc, cfg, machine, ip, tcp);
}

/* ------------------------------------------------------------ entry point */

static __always_inline int edge_core(void *ctx, const int tc)
{
    void *data = ep_data(ctx, tc);
    void *data_end = ep_data_end(ctx, tc);
    stat_inc(STAT_PACKETS);

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end) {
        anomaly_inc(ANOM_TRUNC_ETH);
        return pass();
    }
    if (eth_proto(eth) != bpf_htons(ETH_P_IP))
        return pass();   /* ARP, IPv6 (not steered yet), ...: the kernel's */

    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5 ||
        bpf_ntohs(ip->tot_len) < ip->ihl * 4 ||
        sizeof(struct ethhdr) + bpf_ntohs(ip->tot_len) >
            (tc ? ep_len(ctx, tc) : (__u32)(data_end - data))) {
        anomaly_inc(ANOM_BAD_IP);
        return pass();   /* the kernel validates IP headers and drops these itself */
    }

    __u32 zero = 0;
    struct dp_config *cfg;
    if (ip->protocol == IPPROTO_IPIP) {
        cfg = config.lookup(&zero);
        if (!cfg)
            return pass();
        if (ip->daddr == cfg->host_addr)
            return edge_return(ctx, tc);
    }
    if (!maybe_vip(ip->daddr))
        return pass();   /* certainly not a raw-TCP VIP: no lookup of any other map */
    cfg = config.lookup(&zero);
    if (!cfg)
        return pass();
    return edge_forward(ctx, tc, cfg, ip, data_end);
}

int edge_xdp(struct xdp_md *ctx)
{
    return edge_core(ctx, 0);
}

/* TC clsact ingress, direct action: the same core on an skb */
int edge_tc(struct __sk_buff *skb)
{
    ep_pull_headers(skb);
    return tc_verdict(skb, edge_core(skb, 1));
}

/* --------------------------------------------- idle sweep (test-run only) */

/* Run by the control plane through BPF_PROG_TEST_RUN with a sweep_request as
 * the "packet": expires one conntrack entry if it has been idle long enough,
 * with the same fetch_or as the datapath so a flow closed concurrently is
 * decremented exactly once. Never attached to an interface. */
int edge_sweep(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct sweep_request *rq = data;
    if ((void *)(rq + 1) > data_end)
        return SWEEP_KEPT;
    struct ct_key key = {};
    __builtin_memcpy(&key, &rq->key, sizeof(key));
    u64 idle_ns = rq->idle_ns;

    struct ct_value *ct = conntrack.lookup(&key);
    if (!ct)
        return SWEEP_KEPT;
    if (ct->last_seen_ns + idle_ns > bpf_ktime_get_ns())
        return SWEEP_KEPT;
    /* CT_REUSED also blocks a SYN from claiming the entry while we delete it */
    u64 old = __sync_fetch_and_or(&ct->flags, CT_CLOSED | CT_EXPIRED | CT_REUSED);
    if (old & CT_REUSED)
        return SWEEP_KEPT;   /* a new SYN is replacing it right now */
    int ret = SWEEP_REMOVED;
    if (!(old & CT_CLOSED)) {
        __u32 machine = ct->machine;
        release(machine);
        struct machine_stats *ms = machine_stats.lookup(&machine);
        if (ms)
            ms->expired += 1;
        ret = SWEEP_EXPIRED;
    }
    conntrack.delete(&key);
    return ret;
}
