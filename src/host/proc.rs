//! The process's mappings and their limit, from `/proc`: `vm.max_map_count`,
//! the number of lines of `/proc/self/maps` and their ranges, and the
//! memory totals of `/proc/self/smaps_rollup`.

use std::{fs, io, io::Read};

/// `/proc/self/maps`, for error messages.
pub(crate) const MAPS: &str = "/proc/self/maps";
/// `/proc/self/smaps_rollup`, for error messages.
pub(crate) const SMAPS_ROLLUP: &str = "/proc/self/smaps_rollup";

/// `vm.max_map_count`, or `None` where the sysctl cannot be read.
pub(crate) fn max_map_count() -> Option<u64> {
    fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Mappings of this process now: the lines of `/proc/self/maps`, counted
/// through a small buffer (at 60,000 mappings the text is 6 MiB, which a
/// `read_to_string` per refresh allocated).
pub(crate) fn mapping_count() -> Option<u64> {
    let mut f = fs::File::open(MAPS).ok()?;
    let mut buf = [0u8; 16 * 1024];
    let mut lines = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Some(lines),
            Ok(n) => lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Each mapping of this process as its `[start, end)` host addresses
/// (`None` for a line that does not parse), in `/proc/self/maps` order.
pub(crate) fn mappings() -> io::Result<Vec<Option<(u64, u64)>>> {
    let maps = fs::read_to_string(MAPS)?;
    Ok(maps
        .lines()
        .map(|line| {
            let (span, _) = line.split_once(' ')?;
            let (a, b) = span.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect())
}

/// The process's memory totals (`/proc/self/smaps_rollup`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Rollup {
    /// Resident set, bytes.
    pub(crate) rss: u64,
    /// Proportional set, bytes.
    pub(crate) pss: u64,
    /// Anonymous memory, bytes.
    pub(crate) anon: u64,
}

/// Reads `/proc/self/smaps_rollup`; a field it lacks reads 0.
pub(crate) fn rollup() -> io::Result<Rollup> {
    let rollup = fs::read_to_string(SMAPS_ROLLUP)?;
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    Ok(Rollup {
        rss: field("Rss:"),
        pss: field("Pss:"),
        anon: field("Anonymous:"),
    })
}
