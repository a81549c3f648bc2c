//! The VM-wide state a snapshot may carry beside its vCPUs ([`VmState`]:
//! the guest's kvmclock, the in-kernel irqchip's two PICs and IOAPIC, the
//! in-kernel PIT) as plain data (no KVM feature needed), and the VM part's
//! encoding (header flag bit 3).
//!
//! # VM part (all integers little-endian)
//!
//! | bytes | field |
//! |---|---|
//! | u64 | the part's length `L` in bytes, this field and the checksum included; at most [`VM_PART_MAX`] (checked before anything is read) |
//! | sections to `L - 8` | each: tag u16, zero u16, length u32, then that many bytes; tags strictly increasing, each at most once |
//! | u64 | xxh3-64 (seed `..._0006`) of the part's first `L - 8` bytes |
//!
//! Sections (a section not there was not saved; a tag this build does
//! not know is refused):
//!
//! - 1, the clock (32 bytes): `clock` u64 (ns), `flags` u32, zero u32,
//!   `realtime` u64, `host_tsc` u64 (`struct kvm_clock_data`'s fields);
//! - 2, the irqchip (248 bytes): the master PIC (16 bytes), the slave PIC
//!   (16 bytes), each `struct kvm_pic_state`'s 16 one-byte fields in its
//!   order; the IOAPIC: `base_address` u64, `ioregsel` u32, `id` u32,
//!   `irr` u32, zero u32, 24 redirection entries u64;
//! - 3, the PIT (80 bytes): 3 channels of 24 bytes (`count` u32,
//!   `latched_count` u16, then one byte each: `count_latched`,
//!   `status_latched`, `status`, `read_state`, `write_state`,
//!   `write_latch`, `rw_mode`, `mode`, `bcd`, `gate`, then
//!   `count_load_time` i64), `flags` u32, zero u32.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::error::{Part, Place, Problem, SnapshotError};

/// Seed of the VM part's checksum.
const SEED: u64 = 0x5046_534e_4150_0006;
/// Bytes of the part around its sections: the length field and the
/// checksum.
pub(crate) const VM_PART_MIN: u64 = 16;

const TAG_CLOCK: u16 = 1;
const TAG_IRQCHIP: u16 = 2;
const TAG_PIT: u16 = 3;
const CLOCK_LEN: usize = 32;
const PIC_LEN: usize = 16;
const IOAPIC_LEN: usize = 24 + IOAPIC_PINS * 8;
const IRQCHIP_LEN: usize = 2 * PIC_LEN + IOAPIC_LEN;
const CHANNEL_LEN: usize = 24;
const PIT_LEN: usize = 3 * CHANNEL_LEN + 8;

/// The longest VM part: every section.
pub const VM_PART_MAX: u64 =
    VM_PART_MIN + (8 + CLOCK_LEN as u64) + (8 + IRQCHIP_LEN as u64) + (8 + PIT_LEN as u64);

/// Pins of the in-kernel IOAPIC (`KVM_IOAPIC_NUM_PINS`).
pub const IOAPIC_PINS: usize = 24;

/// KVM's clock flag: the clock is the same on every vCPU (master clock on
/// a stable TSC). Reported by `KVM_GET_CLOCK`; not loaded back.
pub const CLOCK_TSC_STABLE: u32 = 2;
/// KVM's clock flag: [`ClockState::realtime`] holds the host's
/// `CLOCK_REALTIME` at the instant `clock` was read.
pub const CLOCK_REALTIME: u32 = 1 << 2;
/// KVM's clock flag: [`ClockState::host_tsc`] holds the host's TSC at the
/// instant `clock` was read.
pub const CLOCK_HOST_TSC: u32 = 1 << 3;

/// The guest's kvmclock (`KVM_GET_CLOCK`, `struct kvm_clock_data`): the
/// nanoseconds the guest's paravirtual clock reads, and the host's clocks
/// at the same instant where KVM reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockState {
    /// The guest's clock, in nanoseconds.
    pub clock: u64,
    /// `CLOCK_TSC_STABLE`, `CLOCK_REALTIME`, `CLOCK_HOST_TSC` as KVM
    /// reported them.
    pub flags: u32,
    /// The host's `CLOCK_REALTIME` in nanoseconds when `clock` was read
    /// (with [`CLOCK_REALTIME`]).
    pub realtime: u64,
    /// The host's TSC when `clock` was read (with [`CLOCK_HOST_TSC`]).
    pub host_tsc: u64,
}

/// One 8259 PIC of the in-kernel irqchip (`struct kvm_pic_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the 8259's register and latch names, as KVM's
pub struct PicState {
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: u8,
    pub poll: u8,
    pub special_mask: u8,
    pub init_state: u8,
    pub auto_eoi: u8,
    pub rotate_on_auto_eoi: u8,
    pub special_fully_nested_mode: u8,
    pub init4: u8,
    pub elcr: u8,
    pub elcr_mask: u8,
}

impl PicState {
    fn to_bytes(self) -> [u8; PIC_LEN] {
        [
            self.last_irr,
            self.irr,
            self.imr,
            self.isr,
            self.priority_add,
            self.irq_base,
            self.read_reg_select,
            self.poll,
            self.special_mask,
            self.init_state,
            self.auto_eoi,
            self.rotate_on_auto_eoi,
            self.special_fully_nested_mode,
            self.init4,
            self.elcr,
            self.elcr_mask,
        ]
    }

    fn from_bytes(b: [u8; PIC_LEN]) -> Self {
        let [last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll, special_mask, init_state, auto_eoi, rotate_on_auto_eoi, special_fully_nested_mode, init4, elcr, elcr_mask] =
            b;
        PicState {
            last_irr,
            irr,
            imr,
            isr,
            priority_add,
            irq_base,
            read_reg_select,
            poll,
            special_mask,
            init_state,
            auto_eoi,
            rotate_on_auto_eoi,
            special_fully_nested_mode,
            init4,
            elcr,
            elcr_mask,
        }
    }
}

/// The in-kernel IOAPIC (`struct kvm_ioapic_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoapicState {
    /// Its MMIO base (`0xfec0_0000` by default).
    pub base_address: u64,
    /// The register the guest selected (`IOREGSEL`).
    pub ioregsel: u32,
    /// The IOAPIC's id.
    pub id: u32,
    /// Pending interrupt requests, one bit per pin.
    pub irr: u32,
    /// The redirection table: one 64-bit entry per pin (vector, delivery
    /// mode, destination mode, status, polarity, remote IRR, trigger mode,
    /// mask, destination), as the IOAPIC's registers hold it.
    pub redirection: [u64; IOAPIC_PINS],
}

/// The in-kernel irqchip (`KVM_GET_IRQCHIP` of each chip): the two
/// cascaded PICs and the IOAPIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqchipState {
    /// The master 8259 (`KVM_IRQCHIP_PIC_MASTER`).
    pub pic_master: PicState,
    /// The slave 8259 (`KVM_IRQCHIP_PIC_SLAVE`).
    pub pic_slave: PicState,
    /// The IOAPIC (`KVM_IRQCHIP_IOAPIC`).
    pub ioapic: IoapicState,
}

/// One channel of the in-kernel 8254 PIT (`struct kvm_pit_channel_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the 8254's counter and latch names, as KVM's
pub struct PitChannel {
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
    /// When the count was loaded, in the host's monotonic nanoseconds (KVM
    /// restarts the count from the load on `KVM_SET_PIT2`: informative).
    pub count_load_time: i64,
}

/// The in-kernel PIT (`KVM_GET_PIT2`, `struct kvm_pit_state2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PitState {
    /// Channels 0 (the timer interrupt), 1 and 2 (the speaker).
    pub channels: [PitChannel; 3],
    /// `KVM_PIT_FLAGS_HPET_LEGACY` (1) and `KVM_PIT_FLAGS_SPEAKER_DATA_ON`
    /// (2).
    pub flags: u32,
}

/// The VM-wide state KVM keeps outside the vCPUs, as a snapshot carries
/// it (`pagefold::kvm::KvmVm::vm_state` reads it, `set_vm_state` loads
/// it). A `None` part was not saved, or the VM has none (no in-kernel
/// irqchip: the VMM emulates it; no in-kernel PIT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmState {
    /// The guest's kvmclock.
    pub clock: Option<ClockState>,
    /// The in-kernel irqchip (`KVM_CREATE_IRQCHIP`).
    pub irqchip: Option<IrqchipState>,
    /// The in-kernel PIT (`KVM_CREATE_PIT2`).
    pub pit: Option<PitState>,
}

impl VmState {
    /// The part's bytes (module doc's layout).
    pub(crate) fn encode_part(&self) -> Vec<u8> {
        let mut out = vec![0u8; 8];
        let mut section = |tag: u16, bytes: &[u8]| {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&[0, 0]);
            let n = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(bytes);
        };
        if let Some(c) = &self.clock {
            let mut b = Vec::with_capacity(CLOCK_LEN);
            b.extend_from_slice(&c.clock.to_le_bytes());
            b.extend_from_slice(&c.flags.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&c.realtime.to_le_bytes());
            b.extend_from_slice(&c.host_tsc.to_le_bytes());
            section(TAG_CLOCK, &b);
        }
        if let Some(i) = &self.irqchip {
            let mut b = Vec::with_capacity(IRQCHIP_LEN);
            b.extend_from_slice(&i.pic_master.to_bytes());
            b.extend_from_slice(&i.pic_slave.to_bytes());
            let io = &i.ioapic;
            b.extend_from_slice(&io.base_address.to_le_bytes());
            b.extend_from_slice(&io.ioregsel.to_le_bytes());
            b.extend_from_slice(&io.id.to_le_bytes());
            b.extend_from_slice(&io.irr.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            for e in io.redirection {
                b.extend_from_slice(&e.to_le_bytes());
            }
            section(TAG_IRQCHIP, &b);
        }
        if let Some(p) = &self.pit {
            let mut b = Vec::with_capacity(PIT_LEN);
            for c in &p.channels {
                b.extend_from_slice(&c.count.to_le_bytes());
                b.extend_from_slice(&c.latched_count.to_le_bytes());
                b.extend_from_slice(&[
                    c.count_latched,
                    c.status_latched,
                    c.status,
                    c.read_state,
                    c.write_state,
                    c.write_latch,
                    c.rw_mode,
                    c.mode,
                    c.bcd,
                    c.gate,
                ]);
                b.extend_from_slice(&c.count_load_time.to_le_bytes());
            }
            b.extend_from_slice(&p.flags.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            section(TAG_PIT, &b);
        }
        let len = out.len() as u64 + 8;
        out[..8].copy_from_slice(&len.to_le_bytes());
        let sum = xxh3_64_with_seed(&out, SEED);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }
}

/// A little-endian integer at `k` of `b` (zeros past its end: callers
/// check lengths first).
fn le<const N: usize>(b: &[u8], k: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = b.get(k..k + N) {
        a.copy_from_slice(s);
    }
    a
}

/// Reads a VM part at file offset `at` (the whole part, as its length
/// field sizes it, checked against [`VM_PART_MAX`] and the file's size by
/// the caller): checksum first, then every section.
pub(crate) fn parse_part(bytes: &[u8], at: u64) -> Result<VmState, SnapshotError> {
    let bad = |k: usize, what: String| {
        SnapshotError::malformed(Part::VmState, at + k as u64, Problem::Section { what })
    };
    if (bytes.len() as u64) < VM_PART_MIN {
        return Err(SnapshotError::malformed(
            Part::VmState,
            at,
            Problem::Overflow("the VM part's length (under 16 bytes)"),
        ));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    let found = u64::from_le_bytes(le(sum, 0));
    let computed = xxh3_64_with_seed(body, SEED);
    if found != computed {
        return Err(SnapshotError::Checksum {
            at: Place::new(Part::VmState, at),
            found,
            computed,
        });
    }
    let reserved = |k: usize, n: usize| -> Result<(), SnapshotError> {
        match body[k..k + n].iter().position(|&x| x != 0) {
            None => Ok(()),
            Some(z) => Err(SnapshotError::malformed(
                Part::VmState,
                at + (k + z) as u64,
                Problem::Reserved(body[k + z]),
            )),
        }
    };
    let mut state = VmState::default();
    let mut last_tag = 0u16;
    let mut s = 8usize;
    while s < body.len() {
        if body.len() - s < 8 {
            return Err(bad(s, "section header cut by the part's end".into()));
        }
        let tag = u16::from_le_bytes(le(body, s));
        reserved(s + 2, 2)?;
        let len = u32::from_le_bytes(le(body, s + 4)) as usize;
        let d = s + 8;
        let (name, want) = match tag {
            TAG_CLOCK => ("clock", CLOCK_LEN),
            TAG_IRQCHIP => ("irqchip", IRQCHIP_LEN),
            TAG_PIT => ("PIT", PIT_LEN),
            _ => {
                return Err(bad(
                    s,
                    format!("section tag {tag} unknown to this build (a newer writer's?)"),
                ))
            }
        };
        if tag <= last_tag {
            return Err(bad(
                s,
                format!("section {tag} ({name}) after section {last_tag}: out of order or twice"),
            ));
        }
        last_tag = tag;
        if len > body.len() - d {
            return Err(bad(
                s,
                format!(
                    "section {tag} ({name}) of {len} bytes, the part has {} left",
                    body.len() - d
                ),
            ));
        }
        if len != want {
            return Err(bad(
                s,
                format!("section {tag} ({name}) is {len} bytes, expected {want}"),
            ));
        }
        let data = &body[d..d + len];
        let u32_at = |k: usize| u32::from_le_bytes(le(data, k));
        let u64_at = |k: usize| u64::from_le_bytes(le(data, k));
        match tag {
            TAG_CLOCK => {
                reserved(d + 12, 4)?;
                state.clock = Some(ClockState {
                    clock: u64_at(0),
                    flags: u32_at(8),
                    realtime: u64_at(16),
                    host_tsc: u64_at(24),
                });
            }
            TAG_IRQCHIP => {
                let io = 2 * PIC_LEN;
                reserved(d + io + 20, 4)?;
                state.irqchip = Some(IrqchipState {
                    pic_master: PicState::from_bytes(le(data, 0)),
                    pic_slave: PicState::from_bytes(le(data, PIC_LEN)),
                    ioapic: IoapicState {
                        base_address: u64_at(io),
                        ioregsel: u32_at(io + 8),
                        id: u32_at(io + 12),
                        irr: u32_at(io + 16),
                        redirection: std::array::from_fn(|p| u64_at(io + 24 + p * 8)),
                    },
                });
            }
            _ => {
                reserved(d + 3 * CHANNEL_LEN + 4, 4)?;
                state.pit = Some(PitState {
                    channels: std::array::from_fn(|c| {
                        let k = c * CHANNEL_LEN;
                        let b = &data[k + 6..k + 16];
                        PitChannel {
                            count: u32_at(k),
                            latched_count: u16::from_le_bytes(le(data, k + 4)),
                            count_latched: b[0],
                            status_latched: b[1],
                            status: b[2],
                            read_state: b[3],
                            write_state: b[4],
                            write_latch: b[5],
                            rw_mode: b[6],
                            mode: b[7],
                            bcd: b[8],
                            gate: b[9],
                            count_load_time: i64::from_le_bytes(le(data, k + 16)),
                        }
                    }),
                    flags: u32_at(3 * CHANNEL_LEN),
                });
            }
        }
        s = d + len;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn full() -> VmState {
        VmState {
            clock: Some(ClockState {
                clock: 123_456_789,
                flags: CLOCK_TSC_STABLE | CLOCK_REALTIME,
                realtime: 1_700_000_000_000_000_000,
                host_tsc: 99,
            }),
            irqchip: Some(IrqchipState {
                pic_master: PicState {
                    imr: 0xfb,
                    irq_base: 0x20,
                    elcr_mask: 0xf8,
                    ..PicState::default()
                },
                pic_slave: PicState {
                    irq_base: 0x28,
                    init4: 1,
                    ..PicState::default()
                },
                ioapic: IoapicState {
                    base_address: 0xfec0_0000,
                    ioregsel: 0x10,
                    id: 0,
                    irr: 4,
                    redirection: std::array::from_fn(|p| 0x1_0000 | (0x30 + p as u64)),
                },
            }),
            pit: Some(PitState {
                channels: std::array::from_fn(|c| PitChannel {
                    count: [0x1_0000, 0xfff0, 0x1234][c],
                    mode: 2,
                    rw_mode: 3,
                    gate: 1,
                    count_load_time: -5,
                    ..PitChannel::default()
                }),
                flags: 1,
            }),
        }
    }

    #[test]
    fn parts_round_trip_with_any_sections() {
        let f = full();
        for mask in 0..8 {
            let s = VmState {
                clock: f.clock.filter(|_| mask & 1 != 0),
                irqchip: f.irqchip.filter(|_| mask & 2 != 0),
                pit: f.pit.filter(|_| mask & 4 != 0),
            };
            let b = s.encode_part();
            assert_eq!(u64::from_le_bytes(le(&b, 0)), b.len() as u64);
            assert_eq!(parse_part(&b, 0).ok(), Some(s), "mask {mask}");
        }
        assert_eq!(f.encode_part().len() as u64, VM_PART_MAX, "exact bound");
    }

    #[test]
    fn every_flipped_byte_is_an_error() {
        let b = full().encode_part();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(parse_part(&c, 0).is_err(), "byte {i}");
        }
    }
}
