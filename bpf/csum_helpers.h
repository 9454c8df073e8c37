/* csum_helpers.h - Internet checksum arithmetic on raw (network order) words.
 *
 * One's-complement sums do not care about byte order as long as every word is
 * taken the same way, so values are used exactly as loaded from the packet. */
#ifndef EDGEPROXY_CSUM_HELPERS_H
#define EDGEPROXY_CSUM_HELPERS_H

static __always_inline __u16 ep_csum_fold(__u64 sum)
{
    /* three folds are enough for any sum of < 2^32 words */
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

/* The same for a sum of at most 16 16-bit values (< 2^20): the first fold
 * leaves at most 0xffff + 15, the second at most 0xffff. */
static __always_inline __u16 ep_csum_fold16(__u64 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

/* ~m + m' of RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for a 32-bit field and
 * left unfolded: one address change goes into both the IP and the TCP (pseudo
 * header) checksum, so it is summed once; the caller adds ~HC and folds. */
static __always_inline __u64 ep_csum_diff4(__u32 from, __u32 to)
{
    return (__u16)~(from & 0xffff) + (__u16)~(from >> 16) + (to & 0xffff) + (to >> 16);
}

/* Sum of 'words' 16-bit words at p; 'words' is a compile-time constant at every
 * call site so the loop unrolls (no loop for the verifier to bound). The caller
 * has already checked p + 2*words <= data_end. */
static __always_inline __u64 ep_csum_add_words(__u64 sum, __u16 *p, const int words)
{
#pragma unroll
    for (int i = 0; i < words; i++)
        sum += p[i];
    return sum;
}

#endif
