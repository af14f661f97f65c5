//! Readings of this process's resources (Linux `/proc`), for the CLI and the benchmarks.
//! Each is `None` where `/proc` does not have it.

fn status_kib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resident memory now, in MiB.
pub fn rss_mib() -> Option<f64> {
    status_kib("VmRSS").map(|kib| kib / 1024.0)
}

/// Resident memory now split into anonymous pages (the process's own allocations) and
/// file-backed pages (mapped files: shared with the page cache and reclaimable), in MiB.
pub fn rss_split_mib() -> Option<(f64, f64)> {
    Some((
        status_kib("RssAnon")? / 1024.0,
        status_kib("RssFile")? / 1024.0,
    ))
}

/// The most resident memory so far, in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    status_kib("VmHWM").map(|kib| kib / 1024.0)
}

/// CPU seconds used so far (user + system, all threads).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the parenthesized command name, utime and stime are the 12th and 13th fields.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    // The kernel reports clock ticks, 100 per second on Linux.
    Some((user + system) / 100.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn readings_are_plausible_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = super::rss_mib().unwrap();
            assert!(rss > 0.1 && rss <= super::peak_rss_mib().unwrap());
            assert!(super::cpu_seconds().unwrap() >= 0.0);
        }
    }
}
