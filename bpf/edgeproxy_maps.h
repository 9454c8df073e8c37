/* edgeproxy_maps.h - every map, nothing else. All pinned under PIN_DIR so a
 * restarted control plane (or edgectl) adopts them instead of resetting them. */
#ifndef EDGEPROXY_MAPS_H
#define EDGEPROXY_MAPS_H

#include "edgeproxy_consts.h"
#include "edgeproxy_structs.h"

BPF_TABLE_PINNED("array", u32, struct dp_config, config, 1, PIN_DIR "/config");

#ifdef EDGEPROXY_EDGE
/* routing: written by the control plane (sync), read by the datapath */
BPF_TABLE_PINNED("hash", struct service_key, struct service_value, services,
                 2 * MAX_SERVICES, PIN_DIR "/services", BPF_F_NO_PREALLOC);
/* pre-filter: bit hash(daddr) set for every raw-TCP VIP (false positives only) */
BPF_TABLE_PINNED("array", u32, u64, vip_filter, VIP_FILTER_BITS / 64, PIN_DIR "/vip_filter");
/* per hash(VIP, port) bucket: bumped after a services key of it is deleted */
BPF_TABLE_PINNED("array", u32, u32, key_epoch, KEY_EPOCH_SLOTS, PIN_DIR "/key_epoch");
BPF_TABLE_PINNED("hash", struct maglev_key, u32, maglev,
                 MAX_MAGLEV_SLOTS, PIN_DIR "/maglev", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct backend_key, struct backend_value, backends,
                 MAX_BACKEND_ENTRIES, PIN_DIR "/backends", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct machine_value, machines, MAX_MACHINES,
                 PIN_DIR "/machines");
BPF_TABLE_PINNED("array", u32, struct label, machine_labels, MAX_MACHINES,
                 PIN_DIR "/machine_labels");
BPF_TABLE_PINNED("array", u32, struct label, service_labels, MAX_SERVICES,
                 PIN_DIR "/service_labels");

/* flow state: written by the datapath (and the sweep program) */
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_value, conntrack, MAX_FLOWS,
                 PIN_DIR "/conntrack");
/* live connections per machine: ONE shared value (atomics), read for hard_limit */
BPF_TABLE_PINNED("array", u32, u64, machine_active, MAX_MACHINES, PIN_DIR "/machine_active");

/* counters: per-CPU, summed by the reader */
BPF_TABLE_PINNED("percpu_array", u32, struct machine_stats, machine_stats, MAX_MACHINES,
                 PIN_DIR "/machine_stats");
BPF_TABLE_PINNED("percpu_array", u32, struct service_stats, service_stats, MAX_SERVICES,
                 PIN_DIR "/service_stats");
BPF_TABLE_PINNED("percpu_array", u32, u64, edge_stats, STAT_MAX, PIN_DIR "/edge_stats");
BPF_TABLE_PINNED("percpu_array", u32, u64, anomalies, ANOM_MAX, PIN_DIR "/anomalies");
BPF_TABLE_PINNED("percpu_array", u32, struct flood_state, flood, 1, PIN_DIR "/flood");
#endif

#ifdef EDGEPROXY_WORKER
BPF_TABLE_PINNED("lru_hash", struct worker_flow_key, struct worker_flow_value, worker_flows,
                 MAX_FLOWS, PIN_DIR "/worker_flows");
BPF_TABLE_PINNED("percpu_array", u32, u64, worker_stats, WSTAT_MAX, PIN_DIR "/worker_stats");
#endif

#endif
