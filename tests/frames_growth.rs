//! A growth of the frame store that is refused (too large) or fails (the
//! kernel refuses `ftruncate`) leaves the store as it was: no frame handed
//! out afterwards lies past the memfd's end (an access there is `SIGBUS`).
//! Found by review. One test, run alone in this binary: it lowers the
//! process's file-size limit for a moment.

#![allow(clippy::unwrap_used)]

use std::{os::fd::AsRawFd, sync::Arc};

use pagefold::{frames::FrameStore, GuestMemory, GuestPhysAddr, PAGE_SIZE};

fn file_frames(store: &FrameStore) -> u64 {
    // SAFETY: a plain fstat into a zeroed, writable buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the store's descriptor is open; `st` is a valid out-pointer.
    assert_eq!(unsafe { libc::fstat(store.as_raw_fd(), &mut st) }, 0);
    st.st_size as u64 / PAGE_SIZE as u64
}

fn set_file_size_limit(bytes: libc::rlim_t) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscalls with valid arguments; SIGXFSZ ignored so a
    // refused ftruncate is an EFBIG error, not a signal.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

#[test]
fn failed_or_refused_growth_hands_out_no_frame_past_the_file() {
    // Refused: a 4 PiB region, then a small one.
    let store = Arc::new(FrameStore::memfd().unwrap());
    let _a = GuestMemory::with_store(store.clone(), &[(GuestPhysAddr(0), 4096)]).unwrap();
    assert!(GuestMemory::with_store(store.clone(), &[(GuestPhysAddr(0), 1 << 52)]).is_err());
    let c = GuestMemory::with_store(store.clone(), &[(GuestPhysAddr(0), 4096)]).unwrap();
    let fr = c.regions()[0].frames();
    assert!(
        fr.end() <= file_frames(&store),
        "frames {fr:?} past the file"
    );
    assert_eq!(store.len_frames(), file_frames(&store));
    c.write(GuestPhysAddr(0), &[1, 2, 3]).unwrap();

    // Failed: growing over a free run at the file's end when ftruncate is
    // refused (file-size limit of 8 frames).
    let store = FrameStore::memfd().unwrap();
    let _a = store.allocate(4).unwrap();
    let b = store.allocate(4).unwrap();
    store.free(b).unwrap();
    set_file_size_limit(8 * PAGE_SIZE as libc::rlim_t);
    let refused = store.allocate(8);
    set_file_size_limit(libc::RLIM_INFINITY);
    assert!(refused.is_err(), "ftruncate past the limit must fail");
    assert_eq!(store.len_frames(), file_frames(&store));
    // What is left is handed out inside the file, then the file grows.
    let r = store.allocate(4).unwrap();
    assert!(r.end() <= file_frames(&store), "frames {r:?} past the file");
    let r = store.allocate(8).unwrap();
    assert!(r.end() <= file_frames(&store), "frames {r:?} past the file");
    store
        .write_frames(r.start, &vec![7u8; 8 * PAGE_SIZE])
        .unwrap();
}
