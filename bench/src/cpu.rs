//! Where a run's CPU time goes: the machine, the broker's processes, Redis,
//! this process, and a child's peak memory, all read from /proc (and Redis's
//! INFO).

use anyhow::Context;

/// CPU seconds used so far: by the whole machine (busy time of all cores),
/// by the broker (its processes: `beam.smp`, `tansu`, …), by Redis (its own INFO)
/// and by this process.
#[derive(Default)]
pub struct CpuSample {
    pub host: f64,
    pub broker: f64,
    pub redis: f64,
    pub bench: f64,
}

impl CpuSample {
    pub async fn take(
        redis: &mut redis::aio::MultiplexedConnection,
        (broker_process, broker_command): (&str, &str),
    ) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let busy: u64 = stat
            .lines()
            .next()
            .context("/proc/stat is empty")?
            .split_whitespace()
            .skip(1)
            .enumerate()
            // user nice system idle iowait irq softirq steal: all but idle and iowait.
            .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
            .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
            .sum();
        let mut broker = 0.0;
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let command = || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if comm.trim() == broker_process
                && String::from_utf8_lossy(&command()).contains(broker_command)
            {
                broker += process_usage(pid).map(|(_, cpu)| cpu).unwrap_or(0.0);
            }
        }
        Ok(Self {
            host: busy as f64 / 100.0,
            broker,
            redis: crate::redis_admin::cpu_seconds(redis).await?,
            bench: process_usage(std::process::id())?.1,
        })
    }

    pub fn since(&self, before: &Self) -> Self {
        Self {
            host: self.host - before.host,
            broker: self.broker - before.broker,
            redis: self.redis - before.redis,
            bench: self.bench - before.bench,
        }
    }
}

/// Peak RSS (KiB) and CPU seconds of a process, from /proc.
pub fn process_usage(pid: u32) -> anyhow::Result<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok((rss, ticks as f64 / 100.0))
}
