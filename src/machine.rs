//! Facts about the machine that both interpreters need before they allocate.

/// `MemAvailable` from /proc/meminfo, in bytes; `None` where it cannot be read.
pub fn mem_available() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
