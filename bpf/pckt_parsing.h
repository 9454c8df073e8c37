/* pckt_parsing.h - bounds-checked views of Ethernet / IPv4 / TCP headers. */
#ifndef EDGEPROXY_PCKT_PARSING_H
#define EDGEPROXY_PCKT_PARSING_H

#define IP_MF     0x2000
#define IP_OFFSET 0x1fff
#define IP_DF     0x4000

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

static __always_inline int ip_is_fragment(struct iphdr *ip)
{
    return (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) != 0;
}

/* The EtherType as one 16-bit load (struct ethhdr is packed, so eth->h_proto
 * compiles to two byte loads and a shift) */
static __always_inline __u16 eth_proto(struct ethhdr *eth)
{
    return *(__u16 *)((void *)eth + offsetof(struct ethhdr, h_proto));
}

/* byte 13 of the TCP header: CWR ECE URG ACK PSH RST SYN FIN */
static __always_inline __u8 tcp_flags(struct tcphdr *tcp)
{
    return ((__u8 *)tcp)[13];
}

/* Outcome of checking a TCP segment inside an IPv4 packet of IHL 5 */
enum tcp_check {
    TCP_OK = 0,
    TCP_TRUNCATED,      /* header does not fit in the packet */
    TCP_BAD_DOFF,       /* data offset < 5 or longer than the IP payload */
};

/* Validate the TCP header at tcp (IP header ip has IHL 5); on success store the
 * payload length (bytes after the TCP header, per the IP total length). */
static __always_inline enum tcp_check tcp_check(struct iphdr *ip, struct tcphdr *tcp,
                                                void *data_end, __u32 *payload)
{
    if ((void *)(tcp + 1) > data_end)
        return TCP_TRUNCATED;
    __u32 ip_len = bpf_ntohs(ip->tot_len);
    __u32 doff = tcp->doff * 4;
    if (doff < sizeof(struct tcphdr) || ip_len < sizeof(struct iphdr) + doff)
        return TCP_BAD_DOFF;
    if ((void *)tcp + doff > data_end)
        return TCP_TRUNCATED;
    *payload = ip_len - sizeof(struct iphdr) - doff;
    return TCP_OK;
}

#endif
