/* flow_hash.h - the flow hash that indexes Maglev tables.
 * Mirrored by edgeproxy.bpfmaps.flow_hash (tests check they agree).
 * Inputs are raw network-order values as loaded (little-endian u32/u16). */
#ifndef EDGEPROXY_FLOW_HASH_H
#define EDGEPROXY_FLOW_HASH_H

#define FLOW_HASH_SEED 0x9e3779b9

/* murmur3 finaliser: full avalanche with two multiplies */
static __always_inline __u32 hash_mix(__u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

static __always_inline __u32 flow_hash(__u32 saddr, __u32 daddr, __u16 sport, __u16 dport)
{
    __u32 h = hash_mix(FLOW_HASH_SEED ^ saddr);
    h = hash_mix(h ^ daddr);
    h = hash_mix(h ^ (((__u32)sport << 16) | dport));
    return h;
}

/* Bit of the VIP pre-filter for an address, and key_epoch slot of a (VIP, port):
 * one multiply and a fold each (these run on every packet; a set bit or a shared
 * slot only costs a lookup, so full avalanche is not needed). Mirrored by
 * edgeproxy.bpfmaps.vip_filter_bit / key_epoch_slot. */
static __always_inline __u32 vip_filter_bit(__u32 daddr)
{
    __u32 h = daddr * 0x9e3779b1;
    return (h ^ (h >> 15)) & (VIP_FILTER_BITS - 1);
}

static __always_inline __u32 key_epoch_slot(__u32 daddr, __u16 dport)
{
    __u32 h = (daddr + (__u32)dport * 0x85ebca6b) * 0x9e3779b1;
    return (h ^ (h >> 15)) & (KEY_EPOCH_SLOTS - 1);
}

#endif
