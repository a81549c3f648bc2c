//! Fuzzes the service's wire decoder. Two inputs:
//! - raw bytes, decoded frame after frame until an error or the need for
//!   more bytes;
//! - a well-formed header (any known kind, a true length) around arbitrary
//!   body bytes, so every message's field checks are reached.
//! Any panic is a crash. Every decoded message must pass
//! `Message::validate`, take at least a header's bytes, and encode to a
//! frame that decodes to the same message, taking the same bytes.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::service::wire::{decode, encode, kind, HEADER_LEN};

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Framed { kind: u8, body: Vec<u8> },
}

const KINDS: [u16; 7] = [
    kind::HELLO,
    kind::ACK,
    kind::BYE,
    kind::WELCOME,
    kind::REMAP,
    kind::RESTORE,
    kind::ERROR,
];

fn consume(bytes: &[u8]) {
    let mut at = 0;
    while let Ok(Some((msg, n))) = decode(&bytes[at..]) {
        assert!(
            n >= HEADER_LEN && n <= bytes.len() - at,
            "frame of {n} bytes"
        );
        assert!(msg.validate().is_ok(), "decoded {msg:?} fails validate");
        let mut again = Vec::new();
        encode(&msg, &mut again);
        match decode(&again) {
            Ok(Some((back, m))) => {
                assert_eq!(back, msg, "re-encoded message differs");
                assert_eq!(m, again.len());
                assert_eq!(m, n, "re-encoded frame has another length");
            }
            other => panic!("re-encoded {msg:?} does not decode: {other:?}"),
        }
        at += n;
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(bytes) => consume(&bytes),
        Input::Framed { kind, body } => {
            let k = KINDS[usize::from(kind) % KINDS.len()];
            let mut b = Vec::with_capacity(HEADER_LEN + body.len());
            b.extend_from_slice(&(body.len() as u32 + 4).to_le_bytes());
            b.extend_from_slice(&k.to_le_bytes());
            b.extend_from_slice(&0u16.to_le_bytes());
            b.extend_from_slice(&body);
            consume(&b);
        }
    }
});
