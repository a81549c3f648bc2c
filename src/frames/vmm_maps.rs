//! What a VMM says about a mapping it made, checked against the kernel's
//! `/proc/self/maps`: every byte of the range is mapped readable and
//! writable, and is either a shared mapping of one file at the offsets
//! given, or anonymous memory. Cheap (one read of the maps file) and done
//! once, when guest memory adopts the mapping; it cannot prove the VMM will
//! keep the mapping, which the adopting constructor's contract covers.

use std::io;

/// What the range must be.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Expect {
    /// A shared mapping of the file `(dev, ino)`, byte `addr` of the range
    /// at file offset `offset`.
    File {
        /// The file's device (`st_dev`).
        dev: u64,
        /// The file's inode (`st_ino`).
        ino: u64,
        /// The file offset of the range's first byte.
        offset: u64,
    },
    /// Anonymous memory, private or shared.
    Anonymous,
}

/// One line of `/proc/self/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Line<'a> {
    start: u64,
    end: u64,
    read: bool,
    write: bool,
    shared: bool,
    offset: u64,
    major: u64,
    minor: u64,
    inode: u64,
    path: &'a str,
}

fn parse(line: &str) -> Option<Line<'_>> {
    let mut parts = line.splitn(6, ' ');
    let (a, b) = parts.next()?.split_once('-')?;
    let perms = parts.next()?.as_bytes();
    let offset = u64::from_str_radix(parts.next()?, 16).ok()?;
    let (major, minor) = parts.next()?.split_once(':')?;
    let inode = parts.next()?.parse().ok()?;
    let path = parts.next().unwrap_or("").trim_start();
    Some(Line {
        start: u64::from_str_radix(a, 16).ok()?,
        end: u64::from_str_radix(b, 16).ok()?,
        read: perms.first() == Some(&b'r'),
        write: perms.get(1) == Some(&b'w'),
        shared: perms.get(3) == Some(&b's'),
        offset,
        major: u64::from_str_radix(major, 16).ok()?,
        minor: u64::from_str_radix(minor, 16).ok()?,
        inode,
        path,
    })
}

/// Checks `[addr, addr + len)` against `maps` (the text of
/// `/proc/self/maps`); `Err` says what does not hold.
fn check_in(maps: &str, addr: u64, len: u64, expect: Expect) -> Result<(), &'static str> {
    let end = addr
        .checked_add(len)
        .ok_or("the range wraps the address space")?;
    let mut cursor = addr;
    for line in maps.lines() {
        if cursor >= end {
            break;
        }
        let Some(l) = parse(line) else {
            return Err("a line of /proc/self/maps does not parse");
        };
        if l.end <= cursor {
            continue;
        }
        if l.start > cursor {
            return Err("part of the range is not mapped");
        }
        if !(l.read && l.write) {
            return Err("part of the range is not mapped readable and writable");
        }
        match expect {
            Expect::File { dev, ino, offset } => {
                if !l.shared {
                    return Err("part of the range is a private mapping, not MAP_SHARED");
                }
                let file_dev = (u64::from(libc::major(dev)), u64::from(libc::minor(dev)));
                if l.inode != ino || (l.major, l.minor) != file_dev {
                    return Err("part of the range maps another file than the one given");
                }
                let at = l.offset.checked_add(cursor - l.start);
                if at != offset.checked_add(cursor - addr) {
                    return Err("the range maps the file at other offsets than the ones given");
                }
            }
            Expect::Anonymous => {
                let anonymous = l.inode == 0
                    || l.path.starts_with("/anon_hugepage")
                    || l.path.starts_with("/dev/zero");
                if !l.shared && !anonymous {
                    return Err(
                        "part of the range is a private mapping of a file, not anonymous memory",
                    );
                }
            }
        }
        cursor = l.end;
    }
    if cursor < end {
        return Err("part of the range is not mapped");
    }
    Ok(())
}

/// Checks `[addr, addr + len)` of this process against `expect` in
/// `/proc/self/maps`. `Ok(Err(what))` names what does not hold; the outer
/// error is a failed read of the maps file.
pub(crate) fn check(addr: u64, len: u64, expect: Expect) -> io::Result<Result<(), &'static str>> {
    let maps = std::fs::read_to_string(crate::host::proc::MAPS)?;
    Ok(check_in(&maps, addr, len, expect))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7f0000000000-7f0000200000 rw-s 00400000 00:01 1234                       /memfd:guest (deleted)
7f0000200000-7f0000400000 rw-s 00600000 00:01 1234                       /memfd:guest (deleted)
7f0000400000-7f0000600000 rw-p 00000000 00:00 0 
7f0000600000-7f0000800000 r--p 00000000 00:00 0 
7f0000800000-7f0000a00000 rw-p 00000000 08:01 99                         /usr/lib/x.so
7f0000c00000-7f0000e00000 rw-p 00000000 00:00 0 
";

    fn file(offset: u64) -> Expect {
        Expect::File {
            dev: libc::makedev(0, 1),
            ino: 1234,
            offset,
        }
    }

    #[test]
    fn a_shared_file_mapping_at_its_offsets_passes() {
        assert_eq!(
            check_in(MAPS, 0x7f00_0000_0000, 0x40_0000, file(0x40_0000)),
            Ok(())
        );
        assert_eq!(
            check_in(MAPS, 0x7f00_0010_0000, 0x20_0000, file(0x50_0000)),
            Ok(())
        );
    }

    #[test]
    fn each_broken_promise_is_named() {
        assert!(check_in(MAPS, 0x7f00_0000_0000, 0x40_0000, file(0))
            .is_err_and(|w| w.contains("other offsets")));
        let other = Expect::File {
            dev: libc::makedev(0, 1),
            ino: 99,
            offset: 0x40_0000,
        };
        assert!(check_in(MAPS, 0x7f00_0000_0000, 0x1000, other)
            .is_err_and(|w| w.contains("another file")));
        assert!(
            check_in(MAPS, 0x7f00_0040_0000, 0x1000, file(0)).is_err_and(|w| w.contains("private"))
        );
        assert!(check_in(MAPS, 0x7f00_0060_0000, 0x1000, Expect::Anonymous)
            .is_err_and(|w| w.contains("readable and writable")));
        assert!(check_in(MAPS, 0x7f00_0080_0000, 0x1000, Expect::Anonymous)
            .is_err_and(|w| w.contains("of a file")));
        assert!(check_in(MAPS, 0x7f00_00df_f000, 0x2000, Expect::Anonymous)
            .is_err_and(|w| w.contains("not mapped")));
        assert!(check_in(MAPS, 0x7f00_00b0_0000, 0x1000, Expect::Anonymous)
            .is_err_and(|w| w.contains("not mapped")));
        assert!(check_in(MAPS, 0x1000, 0x1000, Expect::Anonymous)
            .is_err_and(|w| w.contains("not mapped")));
        assert_eq!(
            check_in(MAPS, 0x7f00_0040_0000, 0x1000, Expect::Anonymous),
            Ok(())
        );
    }
}
