/* edgeproxy_consts.h - limits, flags and counter offsets shared by every program.
 *
 * Every value here has a Python mirror in control/edgeproxy/bpfmaps.py;
 * tests/test_bpf_structs.py compiles this header and checks they agree.
 * Limits marked "(cflag)" are set by the loader with -D at compile time.
 */
#ifndef EDGEPROXY_CONSTS_H
#define EDGEPROXY_CONSTS_H

/* ---- sizes (cflag) -------------------------------------------------- */
#ifndef MAX_SERVICES            /* dense service ids; (VIP, port) keys are 2x this */
#define MAX_SERVICES 262144
#endif
#ifndef MAX_MACHINES            /* dense machine ids (one per machine:internal_port) */
#define MAX_MACHINES 65536
#endif
#ifndef MAX_FLOWS               /* conntrack LRU entries (edge) / reverse-NAT entries (worker) */
#define MAX_FLOWS 1048576
#endif
#ifndef MAX_MAGLEV_SLOTS        /* sum of every service's Maglev table, both generations */
#define MAX_MAGLEV_SLOTS 4194304
#endif
#ifndef MAX_BACKEND_ENTRIES     /* sum of every service's backend list, both generations */
#define MAX_BACKEND_ENTRIES 1048576
#endif
#ifndef VIP_FILTER_BITS         /* VIP pre-filter bitmap, bits (a power of two >= 64) */
#define VIP_FILTER_BITS 4194304
#endif
#ifndef PIN_DIR                 /* bpffs directory of this instance, a string literal */
#define PIN_DIR "/sys/fs/bpf/edgeproxy/default"
#endif

/* Fallback scan over a service's backend list when the Maglev pick is full.
 * A bound for the verifier and for the worst-case cost of one SYN. */
#define MAX_SCAN 64

/* key_epoch slots (a power of two): one u32 per hash(VIP, port) bucket, bumped by
 * the loader after it deletes a services key of that bucket (edge.bpf.c) */
#define KEY_EPOCH_SLOTS 65536
/* ct_value.flags bits 32-63: the key epoch read when the flow was created */
#define CT_EPOCH_SHIFT 32

#define EP_NSEC_PER_SEC 1000000000ULL
/* conntrack last_seen_ns is rewritten only when at least this old (edge.bpf.c,
 * touch_flow): idle times and the sweep are exact to within this much */
#define LAST_SEEN_GRAIN_NS (EP_NSEC_PER_SEC / 4)
#define DEFAULT_TTL 64

/* Experimental IPv4 option (RFC 4727: copied flag + number 30) that carries the
 * original VIP:port from edge to worker on the outer IPIP header, because the
 * inner packet is already DNATed to the machine. 8 bytes: type, len, port, vip. */
#define EP_IPOPT_TYPE 0x9e
#define EP_IPOPT_LEN 8

/* ---- dp_config.flags -------------------------------------------------- */
#define CFG_REFUSE_RST  1   /* over capacity: answer SYN with RST (else drop) */
#define CFG_RESTEER     2   /* non-SYN without conntrack: steer by Maglev (else drop) */

/* ---- service_value.flags ---------------------------------------------- */
#define SVC_F_VIP_MARKER 1  /* key (vip, port 0): "this address is a raw-TCP VIP" */

/* ---- machine_value.flags ---------------------------------------------- */
#define MACHINE_F_IN_USE 1

/* ---- ct_value.flags (u64: bcc/LLVM 14 only has 64-bit atomics) -------- */
#define CT_FIN_IN   1ULL    /* client sent FIN */
#define CT_FIN_OUT  2ULL    /* machine sent FIN */
#define CT_RST      4ULL    /* closed by RST (either side) */
#define CT_CLOSED   8ULL    /* active was decremented; set exactly once with fetch_or */
#define CT_EXPIRED  16ULL   /* closed by the idle sweep */
#define CT_REUSED   32ULL   /* a new SYN claimed this closed entry (cmpxchg winner) */

/* ---- worker_flow_value.flags (u64 for the same reason) ----------------- */
#define WF_FIN_IN   1ULL    /* client sent FIN (seen on ingress) */
#define WF_FIN_OUT  2ULL    /* machine sent FIN (seen on egress) */
#define WF_RST      4ULL    /* RST either way */
/* closed = WF_RST, or both FINs: only the close's own tail (ACKs, retransmitted
 * FINs) is still reverse-NATed; a SYN on the tuple ends the entry */
#define WF_ROUTE_WORDS 7    /* worker_flow_value words before pad2/flags */

/* ---- edge_stats: per-CPU array, index = offset ------------------------ */
#define STAT_PACKETS    0   /* every packet the edge program saw */
#define STAT_FORWARDED  1   /* client->VIP packets DNATed + encapsulated */
#define STAT_RETURNED   2   /* worker->edge IPIP replies decapsulated */
#define STAT_PASSED     3   /* not ours: handed to the kernel untouched */
#define STAT_RST_SENT   4   /* refusals answered with RST (XDP_TX) */
#define STAT_DROPPED    5   /* dropped by a rule (anomaly, refuse-drop, ...) */
#define STAT_MAX        6

/* ---- anomalies: per-CPU array, index = kind --------------------------- */
#define ANOM_TRUNC_ETH      0   /* shorter than an Ethernet header: pass */
#define ANOM_BAD_IP         1   /* truncated IPv4, version!=4, IHL<5, bad tot_len: pass */
#define ANOM_IP_OPTIONS     2   /* IHL>5 to a raw-TCP VIP: drop */
#define ANOM_FRAGMENT       3   /* fragment to a raw-TCP VIP: drop */
#define ANOM_NON_TCP_VIP    4   /* not TCP, to a raw-TCP VIP address: pass (ICMP, PMTU) */
#define ANOM_TRUNC_TCP      5   /* TCP header cut short, to a VIP: drop */
#define ANOM_BAD_DOFF       6   /* data offset <5 or beyond the IP payload, to a VIP: drop */
#define ANOM_BAD_FLAGS      7   /* SYN with FIN or RST, to a VIP: drop */
#define ANOM_FLOOD          8   /* new flow over the per-CPU flood cap: refuse/drop */
#define ANOM_NO_BACKEND     9   /* new flow, no machine with capacity: refuse/drop */
#define ANOM_CT_MISS        10  /* non-SYN without conntrack: resteer or drop */
#define ANOM_BAD_IPIP       11  /* IPIP to us that is malformed or not for a VIP: pass */
#define ANOM_RETURN_NO_CT   12  /* reply without conntrack (resteered/expired): forwarded */
#define ANOM_BAD_MACHINE    13  /* table points at a machine id not in use: drop */
#define ANOM_HEADROOM       14  /* adjust_head/adjust_tail failed: drop */
#define ANOM_MAX            15

/* ---- worker_stats: per-CPU array -------------------------------------- */
#define WSTAT_PACKETS       0   /* every packet the ingress program saw */
#define WSTAT_DECAP         1   /* IPIP from an edge decapsulated toward a machine */
#define WSTAT_REPLIES       2   /* machine replies reverse-NATed + encapsulated */
#define WSTAT_BAD_IPIP      3   /* IPIP to us without our option / malformed: pass */
#define WSTAT_HEADROOM      4   /* adjust_head/adjust_room failed: drop */
#define WSTAT_MAX           5

/* ---- sweep program return codes --------------------------------------- */
#define SWEEP_KEPT      0   /* entry missing, or not idle long enough */
#define SWEEP_EXPIRED   1   /* open flow expired: active--, expired++ (this call won) */
#define SWEEP_REMOVED   2   /* already-closed entry removed, nothing counted */

#endif
