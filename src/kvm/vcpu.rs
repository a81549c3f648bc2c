//! A vCPU of a [`KvmVm`](super::KvmVm): real-mode and 64-bit long-mode
//! setup, a run loop that hands port I/O and `HLT` to the VMM, and the
//! vCPU state a migration carries ([`VcpuState`]).

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    sync::Arc,
};

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, Xsave,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use zerocopy::{FromBytes, IntoBytes};

use super::{
    error::{ioctl, os_error, KvmError},
    regs::{
        control_from_kvm, debug_from_kvm, regs_from_kvm, regs_to_kvm, ControlRegs, DebugRegs, Regs,
    },
};
use crate::{
    addr::{GuestPhysAddr, GuestVirtAddr},
    memory::GuestMemory,
    snapshot::{
        DebugRegisters as SnapDebug, DescriptorTable as SnapTable, Segment as SnapSegment,
        SpecialRegs as SnapSregs, VcpuState as SnapState, EVENTS_LEN as SNAP_EVENTS_LEN,
        LAPIC_LEN as SNAP_LAPIC_LEN,
    },
};

/// How a run ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Exits to userspace (the last one included).
    pub exits: u64,
    /// Port writes passed to the handler.
    pub io_out: u64,
}

/// An exit the VMM handles in [`KvmVcpu::run`].
#[derive(Debug)]
pub enum Exit<'a> {
    /// The guest wrote `data` to `port` (`OUT`).
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written (1, 2 or 4).
        data: &'a [u8],
    },
    /// The guest reads `port` (`IN`): fill `data` (it starts zeroed).
    IoIn {
        /// The port.
        port: u16,
        /// What the guest will read.
        data: &'a mut [u8],
    },
    /// The guest executed `HLT` (with interrupts off: it stays halted
    /// until the next run).
    Halt,
}

/// What [`KvmVcpu::run`] does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Enter the guest again.
    Continue,
    /// Return to the caller; a later [`KvmVcpu::run`] resumes the guest
    /// after the instruction that exited.
    Stop,
}

/// The CPU features a vCPU was given that guest programs care about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuFeatures {
    /// `XSAVE` (and with it `CR4.OSXSAVE` in long mode).
    pub xsave: bool,
    /// AVX: 256-bit vector stores (`XCR0` enables its state in long mode).
    pub avx: bool,
}

/// Where a 64-bit guest starts: see [`KvmVcpu::setup_long_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongMode {
    /// Guest-physical address of the PML4 (4-level paging).
    pub cr3: GuestPhysAddr,
    /// Guest-virtual address of the first instruction.
    pub entry: GuestVirtAddr,
    /// Initial `RSP` (guest-virtual).
    pub stack: GuestVirtAddr,
    /// Initial `RDI` and `RSI`: arguments for the guest program.
    pub args: [u64; 2],
    /// Start the program in ring 3 (user mode, with `IOPL` 3 so it may
    /// still use port I/O; `HLT` is then not allowed: signal the end with
    /// a port write instead). Every page it touches must be mapped with
    /// the U/S bit at every level. Needed where KVM is PVM
    /// (`kvm_pvm`, KVM on shadow page tables without VMX): there only
    /// ring-3 guest code runs natively, ring 0 goes through KVM's
    /// instruction emulator (slow, and without most SSE instructions).
    pub user_mode: bool,
}

/// A vCPU of a [`KvmVm`](super::KvmVm).
#[derive(Debug)]
pub struct KvmVcpu {
    // Field order matters: `fd` (which keeps the kernel VM and its slots
    // alive) drops before `_mem`.
    fd: VcpuFd,
    features: VcpuFeatures,
    /// Bytes `KVM_SET_XSAVE` reads (`KVM_CAP_XSAVE2` when the vCPU was
    /// created, at least 4096): [`KvmVcpu::set_state`] refuses to load a
    /// 4 KiB area where it is larger.
    xsave_size: usize,
    /// [`KvmVcpu::saved_msrs`].
    saved_msrs: Vec<u32>,
    _mem: Arc<GuestMemory>,
}

// Control-register and EFER bits (Intel SDM vol. 3A, 2.5 and 2.2.1).
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
/// XCR0: x87, SSE and AVX state.
const XCR0_X87_SSE: u64 = 0b011;
const XCR0_AVX: u64 = 0b100;
/// `RFLAGS.IOPL` (bits 12-13) at 3: ring 3 may use port I/O (SDM vol. 1,
/// 3.4.3.3). A flags field, not a page shift.
const RFLAGS_IOPL3: u64 = 0b11 << 12;

impl KvmVcpu {
    pub(super) fn new(
        fd: VcpuFd,
        features: VcpuFeatures,
        xsave_size: usize,
        saved_msrs: Vec<u32>,
        mem: Arc<GuestMemory>,
    ) -> Self {
        KvmVcpu {
            fd,
            features,
            xsave_size,
            saved_msrs,
            _mem: mem,
        }
    }

    /// The vCPU fd, for ioctls this type does not wrap (through the VMM's
    /// own KVM crate, whichever version it links). The fd stays open as
    /// long as the borrow; `KVM_RUN` through it bypasses this type's
    /// `kvm_run` handling, so run the guest with [`run`](Self::run).
    pub fn vcpu_fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }

    /// The general registers (`KVM_GET_REGS`).
    #[cfg(target_arch = "x86_64")]
    pub fn regs(&self) -> Result<Regs, KvmError> {
        let r = self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        Ok(regs_from_kvm(&r))
    }

    /// Loads the general registers (`KVM_SET_REGS`).
    #[cfg(target_arch = "x86_64")]
    pub fn set_regs(&mut self, regs: &Regs) -> Result<(), KvmError> {
        self.fd
            .set_regs(&regs_to_kvm(regs))
            .map_err(ioctl("KVM_SET_REGS"))
    }

    /// The control registers and `EFER` (from `KVM_GET_SREGS`).
    #[cfg(target_arch = "x86_64")]
    pub fn control_regs(&self) -> Result<ControlRegs, KvmError> {
        let s = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        Ok(control_from_kvm(&s))
    }

    /// The features its CPUID offers (KVM's supported CPUID, set at
    /// creation).
    pub fn features(&self) -> VcpuFeatures {
        self.features
    }

    /// Puts the vCPU in 16-bit real mode with every segment based at 0, so
    /// guest-physical address = offset, and `IP` at `entry` (below 64 KiB).
    #[cfg(target_arch = "x86_64")]
    pub fn setup_real_mode(&mut self, entry: GuestPhysAddr) -> Result<(), KvmError> {
        let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        let mut regs = self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        regs.rip = entry.0;
        regs.rflags = 2; // bit 1 is reserved and must be set
        regs.rsp = 0;
        self.fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Puts the vCPU directly in 64-bit mode (no firmware, no mode
    /// switch in the guest): 4-level paging from `mode.cr3` with write
    /// protection and no-execute on, flat 64-bit code and data segments,
    /// SSE enabled (and AVX state in `XCR0` where the vCPU has AVX),
    /// interrupts off. The page tables must map `mode.entry` and the stack;
    /// there is no IDT, so any exception ends in a triple fault, which
    /// [`run`](Self::run) reports as [`KvmError::UnhandledExit`].
    #[cfg(target_arch = "x86_64")]
    pub fn setup_long_mode(&mut self, mode: &LongMode) -> Result<(), KvmError> {
        let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let (cpl, code_sel, data_sel) = if mode.user_mode {
            (3, 0x2b, 0x33)
        } else {
            (0, 0x08, 0x10)
        };
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: code_sel,
            type_: 0b1011, // execute/read, accessed
            present: 1,
            dpl: cpl,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: data_sel,
            type_: 0b0011, // read/write, accessed
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            selector: 0x18,
            limit: 0x67,
            type_: 0b1011, // 64-bit TSS, busy
            s: 0,
            db: 0,
            l: 0,
            g: 0,
            ..code
        };
        sregs.cr3 = mode.cr3.0;
        sregs.cr4 = CR4_PAE
            | CR4_OSFXSR
            | CR4_OSXMMEXCPT
            | if self.features.xsave { CR4_OSXSAVE } else { 0 };
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        if self.features.xsave {
            let mut xcrs = kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = XCR0_X87_SSE | if self.features.avx { XCR0_AVX } else { 0 };
            self.fd.set_xcrs(&xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        }
        let regs = kvm_regs {
            rip: mode.entry.0,
            rsp: mode.stack.0,
            rdi: mode.args[0],
            rsi: mode.args[1],
            // Bit 1 is reserved and must be set; IF off; IOPL 3 in ring 3.
            rflags: 2 | if mode.user_mode { RFLAGS_IOPL3 } else { 0 },
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Runs the guest, handing each port access and `HLT` to `on_exit`
    /// until it returns [`Flow::Stop`]. Any other exit (a triple fault, an
    /// MMIO access, a failed entry) is an error naming the exit and the
    /// guest's `RIP`. A signal that interrupts `KVM_RUN` just re-enters.
    /// On a stop the access is completed first (a port read's value is in
    /// the guest's register, `RIP` past the instruction), so
    /// [`state`](Self::state) then gives a state to resume from anywhere.
    pub fn run(
        &mut self,
        mut on_exit: impl FnMut(Exit<'_>) -> Flow,
    ) -> Result<RunReport, KvmError> {
        let mut report = RunReport::default();
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => {
                    return Err(KvmError::Ioctl {
                        op: "KVM_RUN",
                        source: os_error(&source),
                    })
                }
            };
            report.exits += 1;
            let flow = match exit {
                VcpuExit::Hlt => on_exit(Exit::Halt),
                VcpuExit::IoOut(port, data) => {
                    report.io_out += 1;
                    on_exit(Exit::IoOut { port, data })
                }
                VcpuExit::IoIn(port, data) => {
                    data.fill(0);
                    on_exit(Exit::IoIn { port, data })
                }
                VcpuExit::Intr => Flow::Continue,
                VcpuExit::InternalError => {
                    let detail = self.internal_error();
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
                    return Err(KvmError::UnhandledExit(format!(
                        "internal error ({detail}) at RIP {rip:#x}"
                    )));
                }
                other => {
                    let what = format!("{other:?}");
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
                    return Err(KvmError::UnhandledExit(format!("{what} at RIP {rip:#x}")));
                }
            };
            if flow == Flow::Stop {
                self.complete_pending_exit()?;
                return Ok(report);
            }
        }
    }

    /// Finishes the exit the guest stopped at. KVM completes a port access
    /// only on the next `KVM_RUN` (the value read into `RAX`, `RIP` past
    /// the instruction), so a state taken right after a stop would be the
    /// vCPU *at* the instruction: restored elsewhere (a migration) it would
    /// ask for the port again or repeat the write. One `KVM_RUN` with
    /// `immediate_exit` set completes it and returns `EINTR` without
    /// entering the guest (the KVM API's advice before saving state).
    fn complete_pending_exit(&mut self) -> Result<(), KvmError> {
        self.fd.set_kvm_immediate_exit(1);
        let ran = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(source) => Err(KvmError::Ioctl {
                op: "KVM_RUN (completing the exit before a stop)",
                source: os_error(&source),
            }),
            Ok(exit) => Err(KvmError::UnhandledExit(format!(
                "{exit:?} while completing the exit before a stop"
            ))),
        };
        self.fd.set_kvm_immediate_exit(0);
        ran
    }

    /// The suberror and data words of the last `KVM_EXIT_INTERNAL_ERROR`.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // Called right after `KVM_RUN` returned `KVM_EXIT_INTERNAL_ERROR`.
        // SAFETY: for that exit the kernel fills the `internal` member of
        // the union; every bit pattern of its integer fields is valid.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = usize::try_from(internal.ndata)
            .unwrap_or(0)
            .min(internal.data.len());
        format!(
            "suberror {}, data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    }

    /// Runs until the guest executes `HLT`. Port writes go to `on_io_out`
    /// (port, data); port reads read zeros. Any other exit is an error.
    pub fn run_until_halt(
        &mut self,
        mut on_io_out: impl FnMut(u16, &[u8]),
    ) -> Result<RunReport, KvmError> {
        self.run(|exit| match exit {
            Exit::Halt => Flow::Stop,
            Exit::IoOut { port, data } => {
                on_io_out(port, data);
                Flow::Continue
            }
            Exit::IoIn { .. } => Flow::Continue,
        })
    }

    /// The vCPU's architectural state, for a migration: general registers,
    /// segment and control registers, the whole `XSAVE` area (x87, SSE,
    /// AVX), `XCR0`, the model-specific registers a running kernel depends
    /// on (`MIGRATED_MSRS`: TSC, `SYSCALL`/`SYSENTER` targets, `PAT`,
    /// `KERNEL_GS_BASE`, ... — those this host's KVM has), pending events
    /// (exception, interrupt, NMI, interrupt shadow), the run state and the
    /// debug registers. Take it with the vCPU stopped (after
    /// [`run`](Self::run) returned).
    #[cfg(target_arch = "x86_64")]
    pub fn state(&self) -> Result<VcpuState, KvmError> {
        // The run state first (see `snapshot_state`): reading it accepts
        // a pending INIT or SIPI, which changes the registers.
        let mp_state = self.fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        Ok(VcpuState {
            regs: self.regs()?,
            arch: ArchState {
                sregs: self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
                xsave: self.fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?.region,
                xcrs: self.fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
                events: self
                    .fd
                    .get_vcpu_events()
                    .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
                mp_state,
                debugregs: self
                    .fd
                    .get_debug_regs()
                    .map_err(ioctl("KVM_GET_DEBUGREGS"))?,
            },
            msrs: self.read_msrs()?,
        })
    }

    /// The values of the `MIGRATED_MSRS` this KVM has. `KVM_GET_MSRS` stops
    /// at the first register it lacks; that one is left out and the rest
    /// asked again.
    #[cfg(target_arch = "x86_64")]
    fn read_msrs(&self) -> Result<Vec<(u32, u64)>, KvmError> {
        let mut wanted: &[u32] = &MIGRATED_MSRS;
        let mut out = Vec::with_capacity(wanted.len());
        while !wanted.is_empty() {
            let mut msrs = msr_list(wanted.iter().map(|&index| (index, 0)))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
            let n = n.min(wanted.len());
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            wanted = &wanted[(n + 1).min(wanted.len())..];
        }
        Ok(out)
    }

    /// Loads a state taken by [`state`](Self::state), on this or another
    /// host's vCPU with the same features. If KVM refuses a part, the
    /// vCPU's previous state is loaded back (as far as KVM takes it) and
    /// the error says which part. An MSR outside [`MIGRATED_MSRS`] is
    /// refused ([`KvmError::MsrRefused`]) before anything loads.
    #[cfg(target_arch = "x86_64")]
    pub fn set_state(&mut self, state: &VcpuState) -> Result<(), KvmError> {
        // Only the MSRs `state` takes (a peer's bytes could name any).
        if let Some(&(index, _)) = state.msrs.iter().find(|(i, _)| !MIGRATED_MSRS.contains(i)) {
            return Err(KvmError::MsrRefused { index });
        }
        let before = self.state()?;
        self.load_state(state).inspect_err(|_| {
            let _ = self.load_state(&before);
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn load_state(&mut self, state: &VcpuState) -> Result<(), KvmError> {
        let arch = &state.arch;
        if self.xsave_size > size_of::<kvm_xsave>() {
            return Err(KvmError::XsaveTooLarge {
                size: self.xsave_size,
            });
        }
        self.fd
            .set_sregs(&arch.sregs)
            .map_err(ioctl("KVM_SET_SREGS"))?;
        if arch.xcrs.nr_xcrs > 0 {
            self.fd
                .set_xcrs(&arch.xcrs)
                .map_err(ioctl("KVM_SET_XCRS"))?;
        }
        let xsave = kvm_xsave {
            region: arch.xsave,
            ..Default::default()
        };
        // KVM_SET_XSAVE reads the vCPU's `uabi_size` bytes, which
        // `KVM_CAP_XSAVE2` reported when the vCPU was created (the guest's
        // XSTATE permissions lock at the first vCPU, so it cannot grow
        // since); checked above to be at most `kvm_xsave`'s 4096 bytes.
        // SAFETY: the kernel reads within `xsave`, which lives for the call.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        self.set_regs(&state.regs)?;
        if !state.msrs.is_empty() {
            let msrs = msr_list(state.msrs.iter().copied())?;
            let n = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
            if let Some(&(index, _)) = state.msrs.get(n) {
                return Err(KvmError::MsrRefused { index });
            }
        }
        self.fd
            .set_vcpu_events(&arch.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        self.fd
            .set_mp_state(arch.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        self.fd
            .set_debug_regs(&arch.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
impl KvmVcpu {
    /// The vCPU's whole state as a snapshot carries it, for
    /// [`save_with_vcpus`](crate::snapshot::save_with_vcpus): the
    /// registers (general, control/segment, debug), the `XSAVE` area
    /// (`KVM_GET_XSAVE2` at `KVM_CAP_XSAVE2`'s size, or `KVM_GET_XSAVE`'s
    /// 4 KiB), `XCR0` (`KVM_GET_XCRS`), the MSRs KVM saves (see
    /// [`saved_msrs`](Self::saved_msrs)), the in-kernel local APIC
    /// (`KVM_GET_LAPIC`; `None` where the VM has no in-kernel irqchip: the
    /// one part skipped, by nature), pending events
    /// (`KVM_GET_VCPU_EVENTS`), the run state (`KVM_GET_MP_STATE`) and the
    /// guest's TSC rate (`KVM_GET_TSC_KHZ`).
    /// Any other refusal is an error naming the ioctl: never a state
    /// silently short of a part. Take it with the vCPU stopped (after
    /// [`run`](Self::run) returned).
    pub fn snapshot_state(&self) -> Result<SnapState, KvmError> {
        // The run state first: KVM_GET_MP_STATE accepts a pending INIT or
        // SIPI (resetting the vCPU, or setting `CS:IP` from the vector),
        // so every part read after it is the vCPU it reports.
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(ioctl("KVM_GET_MP_STATE"))?
            .mp_state;
        let lapic = match self.fd.get_lapic() {
            Ok(l) => {
                let mut b = Box::new([0u8; SNAP_LAPIC_LEN]);
                b.copy_from_slice(l.as_bytes());
                Some(b)
            }
            // No in-kernel local APIC (the VMM emulates it, or has none):
            // KVM answers EINVAL (`lapic_in_kernel` false).
            Err(e) if no_lapic(&e) => None,
            Err(e) => return Err(ioctl("KVM_GET_LAPIC")(e)),
        };
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        let mut ev = [0u8; SNAP_EVENTS_LEN];
        ev.copy_from_slice(events.as_bytes());
        // KVM reports XCR0 wherever the host has XSAVE (none: empty).
        let x = self.fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
        let n = usize::try_from(x.nr_xcrs).unwrap_or(0).min(x.xcrs.len());
        let xcrs = x.xcrs[..n].iter().map(|e| (e.xcr, e.value)).collect();
        Ok(SnapState {
            regs: self.regs()?,
            sregs: snap_sregs(&self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?),
            debug: snap_debug(
                &self
                    .fd
                    .get_debug_regs()
                    .map_err(ioctl("KVM_GET_DEBUGREGS"))?,
            ),
            xsave: self.xsave_bytes()?,
            xcrs,
            msrs: {
                let mut m = self.read_msr_list(&self.saved_msrs)?;
                if lapic.is_none() {
                    // KVM refuses to load these without an in-kernel local
                    // APIC, even at 0; at 0 there is no state to keep.
                    m.retain(|&(i, v)| !(lapic_bound(i) && v == 0));
                }
                m
            },
            lapic,
            events: Some(ev),
            mp_state: Some(mp_state),
            // 0: KVM has no rate for the vCPU (nothing to carry).
            tsc_khz: Some(self.fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?)
                .filter(|&k| k != 0),
        })
    }

    /// The MSRs [`snapshot_state`](Self::snapshot_state) saves: of
    /// `KVM_GET_MSR_INDEX_LIST` (the MSRs KVM says a VMM should save, as
    /// Firecracker and cloud-hypervisor take them) those that are vCPU
    /// state, in KVM's order. Left out: the VMX capability MSRs
    /// (`0x480`-`0x491`, read-only facts about the host's nested
    /// virtualisation) and Hyper-V's (`0x4000_0000`-`0x4000_0fff`, only
    /// with Hyper-V enlightenments in CPUID). An MSR of the list that
    /// this vCPU's `KVM_GET_MSRS` refuses (one whose feature its CPUID
    /// lacks: a PMU counter without a PMU) holds no state and is skipped;
    /// so are, on a vCPU without an in-kernel local APIC, the MSRs that
    /// live in it (TSC deadline, x2APIC, KVM's PV EOI and async page
    /// faults) while they hold their reset value 0 (KVM would refuse to
    /// load them back).
    pub fn saved_msrs(&self) -> &[u32] {
        &self.saved_msrs
    }

    /// The `XSAVE` area, `xsave_size` bytes.
    fn xsave_bytes(&self) -> Result<Vec<u8>, KvmError> {
        if self.xsave_size <= size_of::<kvm_xsave>() {
            let x = self.fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
            return Ok(x.region.as_bytes().to_vec());
        }
        let mut x = xsave2(self.xsave_size)?;
        // `x` holds `xsave_size` bytes (rounded up to whole words): what
        // KVM_CAP_XSAVE2 said, when the vCPU was created, KVM_GET_XSAVE2
        // writes (the guest's XSTATE permissions were locked then).
        // SAFETY: the kernel writes within `x`, which lives for the call.
        unsafe { self.fd.get_xsave2(&mut x) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
        let mut out = x.as_fam_struct_ref().xsave.region.as_bytes().to_vec();
        out.extend_from_slice(x.as_slice().as_bytes());
        Ok(out)
    }

    /// Loads a snapshot's vCPU state ([`SnapshotReader::vcpus`]), on this
    /// or another host's vCPU with the same CPUID. Parts the state lacks
    /// ([`SnapState::missing`]: a file from a build that saved registers
    /// only) keep this vCPU's values. Refused with a typed error, the
    /// vCPU's previous state loaded back (as far as KVM takes it): an
    /// `XSAVE` area larger than this vCPU's ([`KvmError::XsaveMismatch`]),
    /// a local APIC state where the VM has no in-kernel irqchip
    /// ([`KvmError::Unsupported`]), an MSR KVM will not take or one
    /// outside this vCPU's [`saved_msrs`](Self::saved_msrs) (refused
    /// before anything loads; [`KvmError::MsrRefused`]), or any ioctl KVM
    /// refuses.
    ///
    /// [`SnapshotReader::vcpus`]: crate::snapshot::SnapshotReader::vcpus
    pub fn set_snapshot_state(&mut self, state: &SnapState) -> Result<(), KvmError> {
        self.check_snapshot_state(state)?;
        let before = self.snapshot_state()?;
        self.load_snapshot_state(state).inspect_err(|_| {
            let _ = self.load_snapshot_state(&before);
        })
    }

    /// What can be checked before anything is loaded.
    fn check_snapshot_state(&self, state: &SnapState) -> Result<(), KvmError> {
        let n = state.xsave.len();
        if n > 0 && (n > self.xsave_size.max(size_of::<kvm_xsave>()) || n % 4 != 0 || n < 4096) {
            return Err(KvmError::XsaveMismatch {
                saved: n,
                here: self.xsave_size,
            });
        }
        // Only the MSRs `snapshot_state` saves: KVM takes from the VMM
        // values and registers the guest could never set itself (a
        // machine-check status, say), and the put-back after a later
        // refusal restores only the saved list.
        if let Some(&(index, _)) = state
            .msrs
            .iter()
            .find(|(i, _)| !self.saved_msrs.contains(i))
        {
            return Err(KvmError::MsrRefused { index });
        }
        if state.xcrs.len() > kvm_xcrs::default().xcrs.len() {
            return Err(KvmError::Unsupported {
                part: "more XCRs than KVM_MAX_XCRS",
                needs: "at most 16 XCRs",
            });
        }
        if state.lapic.is_some() {
            if let Err(e) = self.fd.get_lapic() {
                if no_lapic(&e) {
                    return Err(KvmError::Unsupported {
                        part: "a local APIC state",
                        needs: "an in-kernel irqchip (KVM_CREATE_IRQCHIP) before the vCPU",
                    });
                }
            }
        }
        Ok(())
    }

    fn load_snapshot_state(&mut self, state: &SnapState) -> Result<(), KvmError> {
        // The TSC rate first: KVM converts the TSC value (MSR 0x10) and
        // the TSC deadline loaded below at the vCPU's rate then. Only
        // where it differs (another host's frequency): KVM refuses a rate
        // below this host's without TSC scaling, an error naming the
        // ioctl rather than a guest whose clock runs fast.
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))? != khz {
                self.fd.set_tsc_khz(khz).map_err(ioctl("KVM_SET_TSC_KHZ"))?;
            }
        }
        let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        load_sregs(&mut sregs, &state.sregs);
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        if !state.xcrs.is_empty() {
            let mut x = kvm_xcrs::default();
            for (e, &(xcr, value)) in x.xcrs.iter_mut().zip(&state.xcrs) {
                e.xcr = xcr;
                e.value = value;
            }
            x.nr_xcrs = u32::try_from(state.xcrs.len().min(x.xcrs.len())).unwrap_or(0);
            self.fd.set_xcrs(&x).map_err(ioctl("KVM_SET_XCRS"))?;
        }
        if !state.xsave.is_empty() {
            self.load_xsave(&state.xsave)?;
        }
        self.set_regs(&state.regs)?;
        // The local APIC before the MSRs (as cloud-hypervisor and QEMU
        // order them): KVM ignores `IA32_TSC_DEADLINE` while the APIC timer
        // is not in TSC-deadline mode, and `KVM_SET_LAPIC` switching it
        // into that mode clears the deadline. After `KVM_SET_SREGS`, which
        // loads `APIC_BASE`.
        if let Some(l) = &state.lapic {
            let lapic =
                kvm_lapic_state::read_from_bytes(&l[..]).map_err(|_| KvmError::Unsupported {
                    part: "a local APIC state",
                    needs: "1024 bytes",
                })?;
            self.fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        }
        if !state.msrs.is_empty() {
            for chunk in state.msrs.chunks(MSR_CHUNK) {
                let msrs = msr_list(chunk.iter().copied())?;
                let n = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
                if let Some(&(index, _)) = chunk.get(n) {
                    return Err(KvmError::MsrRefused { index });
                }
            }
        }
        if let Some(m) = state.mp_state {
            self.fd
                .set_mp_state(kvm_mp_state { mp_state: m })
                .map_err(ioctl("KVM_SET_MP_STATE"))?;
        }
        if let Some(e) = &state.events {
            let events =
                kvm_vcpu_events::read_from_bytes(&e[..]).map_err(|_| KvmError::Unsupported {
                    part: "vCPU events",
                    needs: "64 bytes",
                })?;
            self.fd
                .set_vcpu_events(&events)
                .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        }
        let mut d = self
            .fd
            .get_debug_regs()
            .map_err(ioctl("KVM_GET_DEBUGREGS"))?;
        d.db = state.debug.db;
        d.dr6 = state.debug.dr6;
        d.dr7 = state.debug.dr7;
        self.fd
            .set_debug_regs(&d)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }

    /// Loads an `XSAVE` area of at most this vCPU's size (checked by the
    /// caller; a shorter one is padded with zeros: components its
    /// `XSTATE_BV` does not name load in their initial state).
    fn load_xsave(&mut self, area: &[u8]) -> Result<(), KvmError> {
        if self.xsave_size <= size_of::<kvm_xsave>() {
            let mut x = kvm_xsave::default();
            let n = area.len().min(4096);
            x.region.as_mut_bytes()[..n].copy_from_slice(&area[..n]);
            // KVM_SET_XSAVE reads `xsave_size` (at most 4096) bytes.
            // SAFETY: the kernel reads within `x`, live for the call.
            return unsafe { self.fd.set_xsave(&x) }.map_err(ioctl("KVM_SET_XSAVE"));
        }
        let mut x = xsave2(self.xsave_size)?;
        let (head, tail) = area.split_at(area.len().min(4096));
        // SAFETY: only the region is written through the reference, not
        // the wrapper's length field.
        let fam = unsafe { x.as_mut_fam_struct() };
        fam.xsave.region.as_mut_bytes()[..head.len()].copy_from_slice(head);
        let extra = x.as_mut_slice().as_mut_bytes();
        let n = tail.len().min(extra.len());
        extra[..n].copy_from_slice(&tail[..n]);
        // `x` holds `xsave_size` bytes, all KVM_SET_XSAVE reads for this
        // vCPU (KVM_CAP_XSAVE2 when it was created).
        // SAFETY: the kernel reads within `x`, live for the call.
        unsafe { self.fd.set_xsave2(&x) }.map_err(ioctl("KVM_SET_XSAVE"))
    }

    /// The values of `wanted` this vCPU has. `KVM_GET_MSRS` stops at the
    /// first register it refuses; that one is left out and the rest asked
    /// again.
    fn read_msr_list(&self, wanted: &[u32]) -> Result<Vec<(u32, u64)>, KvmError> {
        let mut out = Vec::with_capacity(wanted.len());
        let mut rest = wanted;
        while !rest.is_empty() {
            let ask = &rest[..rest.len().min(MSR_CHUNK)];
            let mut msrs = msr_list(ask.iter().map(|&index| (index, 0)))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
            let n = n.min(ask.len());
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            // All asked were read: go on after them; else skip the refused.
            rest = &rest[(if n == ask.len() { n } else { n + 1 }).min(rest.len())..];
        }
        Ok(out)
    }
}

/// MSRs that live in the in-kernel local APIC: the x2APIC registers, the
/// TSC deadline, and KVM's paravirtual EOI and async-page-fault MSRs
/// (`KVM_SET_MSRS` refuses those without an in-kernel local APIC).
fn lapic_bound(index: u32) -> bool {
    matches!(
        index,
        0x6e0 | 0x800..=0x8ff | 0x4b56_4d02 | 0x4b56_4d04 | 0x4b56_4d06
    )
}

/// Whether a `KVM_GET_LAPIC` error says the vCPU has no in-kernel local
/// APIC (`EINVAL` from `kvm_arch_vcpu_ioctl`; `ENXIO` from older kernels'
/// paths).
fn no_lapic(e: &kvm_ioctls::Error) -> bool {
    e.errno() == libc::EINVAL || e.errno() == libc::ENXIO
}

/// MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS` (kvm-bindings' `Msrs` holds at
/// most `KVM_MAX_MSR_ENTRIES`, 256).
const MSR_CHUNK: usize = 64;

/// A `KVM_GET_XSAVE2` buffer of `size` bytes (rounded up to whole words).
fn xsave2(size: usize) -> Result<Xsave, KvmError> {
    let words = size.saturating_sub(size_of::<kvm_xsave>()).div_ceil(4);
    Xsave::new(words).map_err(|_| KvmError::XsaveMismatch {
        saved: size,
        here: size,
    })
}

/// The MSRs of `KVM_GET_MSR_INDEX_LIST` a snapshot saves
/// ([`KvmVcpu::saved_msrs`]).
pub(super) fn msrs_to_save(index_list: &[u32]) -> Vec<u32> {
    index_list
        .iter()
        .copied()
        .filter(|&i| !(0x480..=0x491).contains(&i) && !(0x4000_0000..=0x4000_0fff).contains(&i))
        .collect()
}

fn snap_segment(g: &kvm_segment) -> SnapSegment {
    SnapSegment {
        base: g.base,
        limit: g.limit,
        selector: g.selector,
        type_: g.type_,
        present: g.present,
        dpl: g.dpl,
        db: g.db,
        s: g.s,
        l: g.l,
        g: g.g,
        avl: g.avl,
        unusable: g.unusable,
    }
}

fn kvm_segment_of(g: &SnapSegment) -> kvm_segment {
    kvm_segment {
        base: g.base,
        limit: g.limit,
        selector: g.selector,
        type_: g.type_,
        present: g.present,
        dpl: g.dpl,
        db: g.db,
        s: g.s,
        l: g.l,
        g: g.g,
        avl: g.avl,
        unusable: g.unusable,
        padding: 0,
    }
}

fn snap_sregs(s: &kvm_sregs) -> SnapSregs {
    SnapSregs {
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        cs: snap_segment(&s.cs),
        ds: snap_segment(&s.ds),
        es: snap_segment(&s.es),
        fs: snap_segment(&s.fs),
        gs: snap_segment(&s.gs),
        ss: snap_segment(&s.ss),
        tr: snap_segment(&s.tr),
        ldt: snap_segment(&s.ldt),
        gdt: SnapTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: SnapTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        interrupt_bitmap: s.interrupt_bitmap,
    }
}

fn load_sregs(k: &mut kvm_sregs, s: &SnapSregs) {
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
    k.cs = kvm_segment_of(&s.cs);
    k.ds = kvm_segment_of(&s.ds);
    k.es = kvm_segment_of(&s.es);
    k.fs = kvm_segment_of(&s.fs);
    k.gs = kvm_segment_of(&s.gs);
    k.ss = kvm_segment_of(&s.ss);
    k.tr = kvm_segment_of(&s.tr);
    k.ldt = kvm_segment_of(&s.ldt);
    k.gdt.base = s.gdt.base;
    k.gdt.limit = s.gdt.limit;
    k.idt.base = s.idt.base;
    k.idt.limit = s.idt.limit;
    k.interrupt_bitmap = s.interrupt_bitmap;
}

fn snap_debug(d: &kvm_debugregs) -> SnapDebug {
    SnapDebug {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
    }
}

/// The model-specific registers a vCPU state carries: what a guest kernel
/// sets once and relies on (`FS`/`GS` bases and `EFER` travel in the
/// segment registers).
pub const MIGRATED_MSRS: [u32; 12] = [
    0x10,        // IA32_TIME_STAMP_COUNTER
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

impl AsFd for KvmVcpu {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the raw fd is `self.fd`'s, open for as long as `self`
        // (and so the returned borrow) lives.
        unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) }
    }
}

impl AsRawFd for KvmVcpu {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Most MSRs a state's byte form may carry.
const MAX_STATE_MSRS: usize = 64;

fn msr_list(entries: impl Iterator<Item = (u32, u64)>) -> Result<Msrs, KvmError> {
    let entries: Vec<kvm_msr_entry> = entries
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|e| KvmError::UnhandledExit(format!("MSR list: {e:?}")))
}

/// A vCPU's state as [`KvmVcpu::state`] takes it, with a byte form to
/// send next to a migration stream. The general registers and MSRs are
/// open; the rest (segments and descriptor tables, the `XSAVE` area,
/// `XCR0`, pending events, the run state, debug registers) travels as the
/// kernel lays it out, readable through [`to_bytes`](Self::to_bytes)
/// (whose layout is documented) with any kvm-bindings version, and in
/// parts through [`control_regs`](Self::control_regs) and
/// [`debug_regs`](Self::debug_regs).
#[derive(Clone, Debug)]
pub struct VcpuState {
    /// General registers, `RIP`, `RFLAGS`.
    pub regs: Regs,
    /// Model-specific registers: (index, value), of [`MIGRATED_MSRS`] those
    /// the source's KVM had.
    pub msrs: Vec<(u32, u64)>,
    arch: ArchState,
}

/// The parts of a [`VcpuState`] kept in the kernel's structures.
#[derive(Clone, Debug)]
struct ArchState {
    /// Segment, descriptor-table and control registers, `EFER`.
    sregs: kvm_sregs,
    /// The `XSAVE` area (4 KiB; `kvm_xsave::region`).
    xsave: [u32; 1024],
    /// Extended control registers (`XCR0`).
    xcrs: kvm_xcrs,
    /// Pending exception, interrupt and NMI, interrupt shadow, SMM.
    events: kvm_vcpu_events,
    /// Run state (runnable, halted, waiting for INIT/SIPI).
    mp_state: kvm_mp_state,
    /// Debug registers.
    debugregs: kvm_debugregs,
}

/// Why [`VcpuState::from_bytes`] refused its input.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum VcpuStateError {
    /// The input is not a vCPU state of this format (wrong magic or
    /// length).
    #[error("not a vCPU state: {0}")]
    Malformed(&'static str),
}

const STATE_MAGIC: &[u8; 8] = b"PFVCPU02";

/// The fixed-size part of the byte form, after the magic.
const FIXED_BYTES: usize = std::mem::size_of::<kvm_regs>()
    + std::mem::size_of::<kvm_sregs>()
    + std::mem::size_of::<[u32; 1024]>()
    + std::mem::size_of::<kvm_xcrs>()
    + std::mem::size_of::<kvm_vcpu_events>()
    + std::mem::size_of::<kvm_mp_state>()
    + std::mem::size_of::<kvm_debugregs>();

impl VcpuState {
    /// Longest byte form (with the most MSRs `from_bytes` takes): a bound
    /// for a receiver reading a length from the wire.
    pub const MAX_BYTES: usize = STATE_MAGIC.len() + FIXED_BYTES + 4 + MAX_STATE_MSRS * 12;

    /// The control registers and `EFER` of the state.
    pub fn control_regs(&self) -> ControlRegs {
        control_from_kvm(&self.arch.sregs)
    }

    /// The debug registers of the state.
    pub fn debug_regs(&self) -> DebugRegs {
        debug_from_kvm(&self.arch.debugregs)
    }

    /// Sets the debug registers of the state (a debugger's breakpoints to
    /// load with [`KvmVcpu::set_state`]).
    pub fn set_debug_regs(&mut self, regs: &DebugRegs) {
        let d = &mut self.arch.debugregs;
        d.db = regs.db;
        d.dr6 = regs.dr6;
        d.dr7 = regs.dr7;
    }

    /// The byte form: the magic `PFVCPU02`, then each structure as the
    /// kernel lays it out (this host's byte order): `struct kvm_regs`,
    /// `kvm_sregs`, the 4096-byte `kvm_xsave.region`, `kvm_xcrs`,
    /// `kvm_vcpu_events`, `kvm_mp_state`, `kvm_debugregs`; then the MSR
    /// count (`u32`) and each MSR as its index (`u32`) and value (`u64`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let arch = &self.arch;
        let mut out =
            Vec::with_capacity(STATE_MAGIC.len() + FIXED_BYTES + 4 + 12 * self.msrs.len());
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(regs_to_kvm(&self.regs).as_bytes());
        out.extend_from_slice(arch.sregs.as_bytes());
        out.extend_from_slice(arch.xsave.as_bytes());
        out.extend_from_slice(arch.xcrs.as_bytes());
        out.extend_from_slice(arch.events.as_bytes());
        out.extend_from_slice(arch.mp_state.as_bytes());
        out.extend_from_slice(arch.debugregs.as_bytes());
        let n = u32::try_from(self.msrs.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_ne_bytes());
        for &(index, value) in &self.msrs {
            out.extend_from_slice(&index.to_ne_bytes());
            out.extend_from_slice(&value.to_ne_bytes());
        }
        out
    }

    /// Parses the byte form of [`to_bytes`](Self::to_bytes): the length
    /// must be exactly what the magic and the MSR count (at most 64) say.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VcpuStateError> {
        let malformed = VcpuStateError::Malformed;
        if bytes.len() < STATE_MAGIC.len() + FIXED_BYTES + 4 {
            return Err(malformed("wrong length"));
        }
        let (magic, rest) = bytes.split_at(STATE_MAGIC.len());
        if magic != STATE_MAGIC {
            return Err(malformed("wrong magic"));
        }
        let (fixed, tail) = rest.split_at(FIXED_BYTES);
        let (count, msr_bytes) = tail.split_at(4);
        let count = u32::from_ne_bytes(count.try_into().map_err(|_| malformed("wrong length"))?);
        let count = usize::try_from(count).map_err(|_| malformed("too many MSRs"))?;
        if count > MAX_STATE_MSRS {
            return Err(malformed("too many MSRs"));
        }
        if msr_bytes.len() != count * 12 {
            return Err(malformed("wrong length"));
        }
        let short = || malformed("truncated");
        let (regs, rest) = fixed.split_at(std::mem::size_of::<kvm_regs>());
        let (sregs, rest) = rest.split_at(std::mem::size_of::<kvm_sregs>());
        let (region, rest) = rest.split_at(std::mem::size_of::<[u32; 1024]>());
        let (xcrs, rest) = rest.split_at(std::mem::size_of::<kvm_xcrs>());
        let (events, rest) = rest.split_at(std::mem::size_of::<kvm_vcpu_events>());
        let (mp_state, debugregs) = rest.split_at(std::mem::size_of::<kvm_mp_state>());
        let msrs = msr_bytes
            .chunks_exact(12)
            .map(|c| {
                let (i, v) = c.split_at(4);
                Some((
                    u32::from_ne_bytes(i.try_into().ok()?),
                    u64::from_ne_bytes(v.try_into().ok()?),
                ))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(short)?;
        Ok(VcpuState {
            regs: regs_from_kvm(&kvm_regs::read_from_bytes(regs).map_err(|_| short())?),
            arch: ArchState {
                xsave: <[u32; 1024]>::read_from_bytes(region).map_err(|_| short())?,
                sregs: kvm_sregs::read_from_bytes(sregs).map_err(|_| short())?,
                xcrs: kvm_xcrs::read_from_bytes(xcrs).map_err(|_| short())?,
                events: kvm_vcpu_events::read_from_bytes(events).map_err(|_| short())?,
                mp_state: kvm_mp_state::read_from_bytes(mp_state).map_err(|_| short())?,
                debugregs: kvm_debugregs::read_from_bytes(debugregs).map_err(|_| short())?,
            },
            msrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut s = VcpuState {
            regs: Regs::default(),
            arch: ArchState {
                sregs: kvm_sregs::default(),
                xsave: [0; 1024],
                xcrs: kvm_xcrs::default(),
                events: kvm_vcpu_events::default(),
                mp_state: kvm_mp_state::default(),
                debugregs: kvm_debugregs::default(),
            },
            msrs: vec![(0xc000_0082, 0xffff_ffff_8100_0000), (0x10, 12345)],
        };
        s.arch.events.nmi.pending = 1;
        s.arch.mp_state.mp_state = 3;
        s.arch.debugregs.dr7 = 0x400;
        s.regs.rip = 0x40134;
        s.regs.r14 = 0xdead_beef;
        s.arch.sregs.cr3 = 0x1000;
        s.arch.sregs.cs.l = 1;
        s.arch.xsave[100] = 7;
        s.arch.xcrs.nr_xcrs = 1;
        s.arch.xcrs.xcrs[0].value = 3;
        s
    }

    #[test]
    fn state_bytes_round_trip() {
        let s = sample();
        let bytes = s.to_bytes();
        assert_eq!(bytes.len(), 8 + FIXED_BYTES + 4 + 2 * 12);
        let back = VcpuState::from_bytes(&bytes).expect("round trip");
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.regs.rip, 0x40134);
        assert_eq!(back.regs.r14, 0xdead_beef);
        assert_eq!(back.control_regs().cr3, 0x1000);
        assert_eq!(back.arch.sregs.cs.l, 1);
        assert_eq!(back.arch.xsave[100], 7);
        assert_eq!(back.arch.events.nmi.pending, 1);
        assert_eq!(back.arch.mp_state.mp_state, 3);
        assert_eq!(back.debug_regs().dr7, 0x400);
        assert_eq!(back.msrs, s.msrs);
    }

    #[test]
    fn malformed_state_bytes_are_refused() {
        let bytes = sample().to_bytes();
        let full = bytes.len();
        for len in [0, 7, 8, 8 + FIXED_BYTES + 3, full - 1, full + 1, full + 12] {
            let mut b = bytes.clone();
            b.resize(len, 0);
            assert_eq!(
                VcpuState::from_bytes(&b).err(),
                Some(VcpuStateError::Malformed("wrong length")),
                "length {len}"
            );
        }
        let mut b = bytes.clone();
        b[0] ^= 1;
        assert_eq!(
            VcpuState::from_bytes(&b).err(),
            Some(VcpuStateError::Malformed("wrong magic"))
        );
        // An MSR count past the limit, or one the bytes do not hold.
        for count in [65u32, u32::MAX, 3] {
            let mut b = bytes.clone();
            b[8 + FIXED_BYTES..8 + FIXED_BYTES + 4].copy_from_slice(&count.to_ne_bytes());
            assert!(VcpuState::from_bytes(&b).is_err(), "count {count}");
        }
    }
}
