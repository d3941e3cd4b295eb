// In-pod redirection without netfilter (eBPF mode): one sk_lookup program for outbound
// capture and one tc ingress program for inbound capture, attached per pod netns by the node
// agent. ztunnel puts its 15001 and 15006 listeners into `listeners`.
//
// Why these shapes (../shared/REDIRECTION.md):
// - Outbound: policy routing sends the app's TCP to `lo` (local route), so the kernel looks
//   for a local socket; sk_lookup hands it ztunnel's 15001 listener, and the accepted
//   socket's local address is the original destination (no NAT, no conntrack).
// - Inbound: tc on eth0 assigns a new connection's SYN to the 15006 listener. Only SYNs: the
//   accepted socket is then found by the normal established lookup. Interface-scoped, so
//   ztunnel's own spoofed connections to the app (over lo) are never re-captured.
// - Fail closed: no listener registered means the packet is dropped, never passed.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2

// Slots of `listeners` and `counters`; keep in step with ebpf/src/maps.rs.
#define SLOT_OUTBOUND 0
#define SLOT_INBOUND 1

#define HBONE_PORT 15008
// Kubelet probes arrive SNATed to this address and go straight to the app, as in Istio.
#define PROBE_IP 0xa9fe077f // 169.254.7.127

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} listeners SEC(".maps");

// The pod's own IPv4 addresses (network byte order): traffic to them is not outbound.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u8);
} pod_ips SEC(".maps");

// Connections dropped because no listener was registered, per slot.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} dropped SEC(".maps");

static __always_inline void count_drop(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&dropped, &slot);
	if (n)
		*n += 1;
}

// Assigns the connection to the listener in `slot`; nonzero (and counted) when there is none
// or the kernel refuses it. `ctx` is the sk_lookup context or the skb: bpf_sk_assign takes
// either, and inlining keeps the verifier aware of which.
static __always_inline int steer(void *ctx, __u32 slot)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(&listeners, &slot);
	if (!sk) {
		count_drop(slot);
		return -1;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		count_drop(slot);
		return -1;
	}
	return 0;
}

SEC("sk_lookup")
int outbound(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || ctx->family != AF_INET)
		return SK_PASS;
	// While a re-install overlaps old and new programs, the first one's choice stands
	// (assigning again would fail with EEXIST). tc needs no such care: sk_assign replaces.
	if (ctx->sk)
		return SK_PASS;
	__u32 dst = ctx->local_ip4;
	if ((bpf_ntohl(dst) >> 24) == 127)
		return SK_PASS;
	// Addressed to the pod itself: inbound (already steered by tc) or pod-local.
	if (bpf_map_lookup_elem(&pod_ips, &dst))
		return SK_PASS;
	if (steer(ctx, SLOT_OUTBOUND))
		return SK_DROP;
	return SK_PASS;
}

SEC("classifier")
int inbound(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl < 5)
		return TC_ACT_OK;
	struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > end)
		return TC_ACT_OK;
	// Only a connection's first packet needs steering; later ones find the accepted socket.
	if (!tcp->syn || tcp->ack)
		return TC_ACT_OK;
	if (tcp->dest == bpf_htons(HBONE_PORT) || ip->saddr == bpf_htonl(PROBE_IP))
		return TC_ACT_OK;
	__u32 daddr = ip->daddr;
	if (!bpf_map_lookup_elem(&pod_ips, &daddr))
		return TC_ACT_OK;
	if (steer(skb, SLOT_INBOUND))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Apache-2.0";
