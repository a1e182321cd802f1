//! observer: an eBPF dataplane that counts and classifies pod traffic in the kernel.
pub mod api;
pub mod bench;
pub mod bpf;
pub mod caps;
pub mod client;
pub mod cluster;
pub mod ctnetlink;
pub mod daemon;
pub mod features;
pub mod filter;
pub mod flowlog;
pub mod flows;
pub mod k8s;
pub mod netlink;
pub mod policy;
pub mod snat;
pub mod tls;
