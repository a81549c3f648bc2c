//! What a whole-machine save carries beside the memory ([`MachineState`]:
//! the vCPUs, the VM-wide KVM state, the VMM's own device state), and the
//! device-state part's encoding (header flag bit 4): opaque bytes the VMM
//! hands over (its virtio queues, serial port, ... in its own format),
//! checksummed, bounded by [`MAX_DEVICE_STATE`].
//!
//! # Device-state part (all integers little-endian)
//!
//! | bytes | field |
//! |---|---|
//! | u64 | the part's length `L` in bytes, this field and the checksum included: the VMM's bytes are `L - 16`, at most [`MAX_DEVICE_STATE`] (checked before anything is read) |
//! | `L - 16` | the VMM's bytes |
//! | u64 | xxh3-64 (seed `..._0007`) of the part's first `L - 8` bytes |

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{
    error::{Part, Place, Problem, SnapshotError},
    vcpu::VcpuState,
    vm::VmState,
};

/// The most bytes of device state a snapshot carries (64 MiB): a save
/// with more is refused, a file claiming more is refused before a byte of
/// the part is read (a sparse file's length costs its author nothing).
pub const MAX_DEVICE_STATE: u64 = 64 << 20;
/// Seed of the device-state part's checksum.
pub(crate) const DEVICE_SEED: u64 = 0x5046_534e_4150_0007;
/// Bytes of the part around the VMM's: the length field and the checksum.
pub(crate) const DEVICE_PART_MIN: u64 = 16;
/// The longest device-state part.
pub(crate) const DEVICE_PART_MAX: u64 = DEVICE_PART_MIN + MAX_DEVICE_STATE;

/// Everything a save of the whole machine carries beside its memory
/// ([`save_machine`](super::save_machine)); each part optional, read back
/// by [`SnapshotReader::vcpus`](super::SnapshotReader::vcpus),
/// [`vm_state`](super::SnapshotReader::vm_state) and
/// [`device_state`](super::SnapshotReader::device_state).
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineState<'a> {
    /// The vCPUs' states, in vCPU order (empty: none saved).
    pub vcpus: &'a [VcpuState],
    /// The VM-wide KVM state (kvmclock, in-kernel irqchip and PIT).
    pub vm: Option<&'a VmState>,
    /// The VMM's own device state, opaque to pagefold, at most
    /// [`MAX_DEVICE_STATE`] bytes (`Some(&[])` is saved, and reads back,
    /// as empty).
    pub device_state: Option<&'a [u8]>,
}

/// Refuses device state over [`MAX_DEVICE_STATE`], before a save reads a
/// page.
pub(crate) fn check_device_state(bytes: &[u8]) -> Result<(), SnapshotError> {
    if bytes.len() as u64 > MAX_DEVICE_STATE {
        return Err(SnapshotError::malformed(
            Part::DeviceState,
            0,
            Problem::TooLarge {
                len: bytes.len() as u64,
                max: MAX_DEVICE_STATE,
            },
        ));
    }
    Ok(())
}

/// The part's bytes for the VMM's `bytes` (checked by
/// [`check_device_state`]).
pub(crate) fn encode_device_part(bytes: &[u8]) -> Vec<u8> {
    let len = bytes.len() as u64 + DEVICE_PART_MIN;
    let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    let sum = xxh3_64_with_seed(&out, DEVICE_SEED);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The checksum of a device-state part's first `L - 8` bytes.
pub(crate) fn device_checksum(body: &[u8]) -> u64 {
    xxh3_64_with_seed(body, DEVICE_SEED)
}

/// Reads a device-state part at file offset `at` (the whole part, as its
/// length field sizes it, bounded by the caller): checksum, then the
/// VMM's bytes.
pub(crate) fn parse_device_part(mut bytes: Vec<u8>, at: u64) -> Result<Vec<u8>, SnapshotError> {
    if (bytes.len() as u64) < DEVICE_PART_MIN {
        return Err(SnapshotError::malformed(
            Part::DeviceState,
            at,
            Problem::Overflow("the device-state part's length (under 16 bytes)"),
        ));
    }
    let n = bytes.len() - 8;
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&bytes[n..]);
    let found = u64::from_le_bytes(sum);
    let computed = device_checksum(&bytes[..n]);
    if found != computed {
        return Err(SnapshotError::Checksum {
            at: Place::new(Part::DeviceState, at),
            found,
            computed,
        });
    }
    bytes.truncate(n);
    bytes.drain(..8);
    Ok(bytes)
}
