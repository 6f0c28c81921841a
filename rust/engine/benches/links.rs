//! How faithfully the link relay gives the links it is asked for: for each bandwidth and
//! one-way delay, the probe's round trip (p50, p99) and throughput each way through a relay
//! on loopback, beside the configured figures, and whether each is within the 10% the report
//! checks. No broker: the relay and the probe alone.
//!
//! Run with `cargo bench -p ms2m-engine --bench links` (part of `make bench`). Environment:
//! `MS2M_BENCH_LINK_MBIT` (comma-separated, default 10,100,1000; 0 is unshaped) and
//! `MS2M_BENCH_LINK_DELAY_MS` (default 2,20,50), `MS2M_BENCH_LINK_JITTER_MS` (default 0).

mod common;

use anyhow::Result;
use ms2m_engine::net::probe::{probe, ProbeServer};
use ms2m_engine::net::LinkSpec;
use std::net::IpAddr;

fn main() -> Result<()> {
    let mbits = common::env_list("MS2M_BENCH_LINK_MBIT", &[10.0, 100.0, 1000.0])?;
    let delays = common::env_list("MS2M_BENCH_LINK_DELAY_MS", &[2.0, 20.0, 50.0])?;
    let jitter = common::env_list("MS2M_BENCH_LINK_JITTER_MS", &[0.0])?[0];
    let ip: IpAddr = "127.0.0.1".parse()?;
    let server = ProbeServer::start(ip)?;
    println!("\nlinks through the relay (loopback, jitter {jitter} ms)");
    println!(
        "{:>8} {:>8} | {:>9} {:>9} {:>9} | {:>9} {:>9} | within 10%",
        "Mbit/s", "delay ms", "rtt want", "rtt p50", "rtt p99", "up Mbit", "down Mbit"
    );
    for &mbit in &mbits {
        for &delay in &delays {
            let shaped = (mbit > 0.0).then_some(mbit);
            let spec = LinkSpec {
                up_mbit: shaped,
                down_mbit: shaped,
                delay_ms: delay,
                jitter_ms: jitter,
            };
            let p = probe(&spec, ip, server.addr(), 1)?;
            let off = p.deviations(&spec);
            println!(
                "{:>8} {:>8} | {:>9.2} {:>9.2} {:>9.2} | {:>9.1} {:>9.1} | {}",
                shaped.map_or("-".into(), |m| format!("{m}")),
                delay,
                2.0 * delay,
                p.rtt_ms_p50,
                p.rtt_ms_p99,
                p.up_mbit,
                p.down_mbit,
                if off.is_empty() {
                    "yes".into()
                } else {
                    off.join("; ")
                }
            );
        }
    }
    Ok(())
}
