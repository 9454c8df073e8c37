/* edgeproxy_structs.h - every map key and value, nothing else.
 *
 * Addresses and ports are kept in network byte order, exactly as they sit in the
 * packet, so the datapath never converts. Padding is explicit so the Python
 * mirror (control/edgeproxy/bpfmaps.py) can match it field for field.
 */
#ifndef EDGEPROXY_STRUCTS_H
#define EDGEPROXY_STRUCTS_H

/* services: (VIP, port, proto) -> service. Port 0 is the VIP marker. */
struct service_key {
    __u32 addr;
    __u16 port;
    __u8 proto;
    __u8 pad;
};

struct service_value {
    __u32 id;           /* dense service id: index of service_stats, labels, maglev key */
    __u32 gen;          /* active generation (0/1) of maglev + backends */
    __u32 maglev_size;  /* slots of the tier-0 Maglev table in that generation (0 = none) */
    __u32 backend_count;/* entries of the backend list in that generation */
    __u32 hard_limit;   /* per machine live connections; 0 = unlimited */
    __u32 flags;        /* SVC_F_* */
};

/* maglev: (service, gen, slot) -> machine id */
struct maglev_key {
    __u32 service;
    __u32 gen;
    __u32 slot;
};

/* backends: (service, gen, index) -> one machine in tier order */
struct backend_key {
    __u32 service;
    __u32 gen;
    __u32 index;
};

struct backend_value {
    __u32 machine;
    __u16 tier_start;   /* index of the first backend of this entry's tier */
    __u16 tier_len;     /* backends in this entry's tier */
};

/* machines: array indexed by machine id */
struct machine_value {
    __u32 addr;         /* machine address */
    __u32 worker;       /* worker host address (outer IPIP destination) */
    __u16 port;         /* internal port */
    __u16 flags;        /* MACHINE_F_* */
    __u32 pad;
};

/* labels: array indexed by machine or service id; lets a restarted control
 * plane (or edgectl) rebuild the id <-> name assignment from the maps alone. */
struct label {
    char app[64];
    char name[64];
};

/* conntrack: client-side 4-tuple (client -> VIP). Every flow is TCP, so the
 * protocol is not part of the key: 12 bytes hash as three words (the kernel's
 * jhash2 then runs no mixing round before its final one) and compare shorter;
 * measured -3 ns per established packet and -2.5 ns per SYN against the
 * 16-byte key with proto + padding (BPF_PROG_TEST_RUN, tools/bench xdp). */
struct ct_key {
    __u32 saddr;
    __u32 daddr;
    __u16 sport;
    __u16 dport;
};

/* One 64-byte value: what both directions read (flags, machine, service) and
 * the per-direction counters share it. Separating the groups onto their own
 * cache lines (a 200-byte value) was measured: it kept each direction's writes
 * off the other's line but nearly doubled a new flow's cost (450 -> 815 ns per
 * BPF_PROG_TEST_RUN new flow: the LRU insert copies the whole value into cold
 * memory). Here a flow whose two directions are served by different CPUs moves
 * the line between them once per packet; a new flow pays one line more. */
struct ct_value {
    __u64 flags;        /* CT_*, changed only with atomics */
    __u64 last_seen_ns; /* coarse monotonic ns of the last packet either way */
    __u32 machine;
    __u32 service;
    __u64 created_ns;   /* when the flow was accepted (its age in edgectl conns) */
    __u64 packets_in;   /* client -> machine; bytes = TCP payload */
    __u64 bytes_in;
    __u64 packets_out;  /* machine -> client */
    __u64 bytes_out;
};

/* machine_stats: per-CPU array indexed by machine id. bytes = TCP payload. */
struct machine_stats {
    __u64 opened;
    __u64 closed;       /* both FINs seen */
    __u64 reset;        /* RST seen (either side) */
    __u64 expired;      /* idle sweep */
    __u64 packets_in;
    __u64 bytes_in;
    __u64 packets_out;
    __u64 bytes_out;
};

/* service_stats: per-CPU array indexed by service id */
struct service_stats {
    __u64 refused;      /* new flow answered with RST */
    __u64 dropped;      /* new flow dropped (drop mode) */
    __u64 no_backend;   /* new flows that found no machine with capacity */
    __u64 flood;        /* new flows over the per-CPU flood cap */
    __u64 resteered;    /* non-SYN packets without conntrack steered by Maglev */
};

/* config: array of one */
struct dp_config {
    __u32 host_addr;    /* this host's address: IPIP outer src (edge) / dst match */
    __u32 flags;        /* CFG_* */
    __u32 flood_cap;    /* new flows per CPU per second; 0 = no cap */
    __u32 pad;
};

/* flood: per-CPU array of one */
struct flood_state {
    __u64 window_start_ns;
    __u64 count;
};

/* sweep program input (BPF_PROG_TEST_RUN data, >= 14 bytes for XDP) */
struct sweep_request {
    struct ct_key key;
    __u32 pad;
    __u64 idle_ns;
};

/* worker_flows: machine-side 4-tuple -> how to send the reply back. The first
 * WF_ROUTE_WORDS 32-bit words are the route (compared on ingress to write only on
 * change); flags follow. */
struct worker_flow_key {
    __u32 machine_addr;
    __u32 client_addr;
    __u16 machine_port;
    __u16 client_port;
};

struct worker_flow_value {
    __u32 vip;
    __u32 edge;         /* edge host address: outer destination of replies */
    __u32 ifindex;      /* interface the flow came in on: replies leave there */
    __u16 vport;
    __u8 edge_mac[6];   /* L2 source of the edge's packets */
    __u8 local_mac[6];  /* our L2 address on that link */
    __u16 pad;
    __u32 pad2;
    __u64 flags;        /* WF_*: how far the connection has closed; atomics only */
};

#endif
