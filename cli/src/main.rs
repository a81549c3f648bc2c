//! The `pagefold` command line: a demo of the library on built-in guests,
//! and operator tools over raw guest RAM images (folding estimates, the
//! guest's page tables), and the host service that folds the memory of
//! VMM processes (`serve`).

mod compare;
mod compare_processes;
mod demo;
mod demo_kvm;
mod estimate;
mod image_scan;
mod images;
mod maps;
mod report;
mod serve;
mod workload;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use pagefold_tools::ksm;

/// pagefold: guest memory virtualization for VMMs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a few VMs' guest memory on one frame store, write and read it,
    /// and print what it holds (the kernel's figures included).
    Demo {
        /// Number of VMs.
        #[arg(long, default_value_t = 3)]
        vms: u32,
        /// Guest RAM per VM, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// Use the software path (library writes stand in for the guests)
        /// even where KVM is usable.
        #[arg(long)]
        no_kvm: bool,
        /// Run each VM in a process of its own under the pagefold service
        /// (as production VMMs run), instead of all VMs in this process
        /// under one dedup host (KVM path only).
        #[arg(long)]
        processes: bool,
        /// Internal: be the receiving process of the KVM demo's migration.
        #[arg(long, hide = true, value_name = "PORT")]
        receive_migration: Option<u16>,
        /// Internal: be VM process INDEX of `--processes`, under the
        /// service at `--socket`.
        #[arg(long, hide = true, value_name = "INDEX", requires = "socket")]
        vm_process: Option<usize>,
        /// Internal: the service socket of `--vm-process`.
        #[arg(long, hide = true)]
        socket: Option<std::path::PathBuf>,
    },
    /// Estimate the saving of folding raw guest RAM images (for example QEMU
    /// memory-backend-file files or dumps), Firecracker snapshot memory
    /// files and cloud-hypervisor snapshot directories. Streams each image once and
    /// compares every claimed duplicate byte for byte, so every figure is
    /// exact; needs no privilege, and memory only for an index of about
    /// 20-40 bytes per distinct page content, however large the images.
    Estimate {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also fold the images with the real scanner and report the
        /// kernel's figure: loads every image into memory and needs
        /// userfaultfd (CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1),
        /// both checked before any work.
        #[arg(long)]
        fold: bool,
        /// A Firecracker snapshot's guest memory file (`mem_file_path`,
        /// of a full snapshot, or of a diff whose holes count as zero
        /// pages), one per VM, repeatable. Its layout is Firecracker's
        /// default for a guest of the file's size (`--firecracker-arch`).
        #[arg(long, value_name = "MEMFILE")]
        firecracker: Vec<PathBuf>,
        /// The architecture whose default memory layout the
        /// `--firecracker` files have.
        #[arg(long, value_enum, value_name = "ARCH", default_value = "x86_64")]
        firecracker_arch: estimate::FirecrackerArchArg,
        /// A cloud-hypervisor snapshot directory (its `memory-ranges`,
        /// laid out by its `state.json`), one per VM, repeatable.
        #[arg(long, value_name = "DIR")]
        cloud_hypervisor: Vec<PathBuf>,
        /// Raw guest RAM images, one per VM.
        #[arg(required_unless_present_any = ["firecracker", "cloud_hypervisor"])]
        images: Vec<PathBuf>,
    },
    /// Fold the same bytes with pagefold and with Linux KSM at its fastest,
    /// and compare (needs root for /sys/kernel/mm/ksm; every KSM setting is
    /// restored, also on Ctrl-C; KSM is set to unmerge, run=2, before and
    /// after, which unmerges every KSM page on the host, other processes'
    /// too: do not run it on a host that relies on KSM). Without images,
    /// runs the built-in workloads.
    CompareKsm {
        /// Run only pagefold's side (for profiling; prints no ratios).
        #[arg(long)]
        no_ksm: bool,
        /// Raise vm.max_map_count to this for the run (restored after); 0
        /// keeps the machine's value. Isolated merges cost the process
        /// mappings, which KSM, inside the kernel, does not need.
        #[arg(long, default_value_t = 1 << 20)]
        max_map_count: u64,
        /// One process per VM, N of them: pagefold's side is a host service
        /// (as `pagefold serve`) with every VM process attached, KSM's the
        /// same processes with MADV_MERGEABLE memory. With images, N is
        /// their number; without, N synthetic booted clones of --mib each.
        #[arg(long, value_name = "N")]
        processes: Option<usize>,
        /// Guest RAM of each synthetic clone with --processes, in MiB.
        #[arg(long, default_value_t = 256, requires = "processes")]
        mib: usize,
        /// Raw guest RAM images, one per VM.
        images: Vec<PathBuf>,
    },
    /// Run the host service: VMM processes put their guest memory under it
    /// over a Unix socket (the library's `ServiceClient`, or the C ABI) and
    /// it folds them, scanning in the background. Prints the socket, then a
    /// stats line every few seconds; stops on SIGINT or SIGTERM and removes
    /// the socket.
    Serve(serve::ServeArgs),
    /// Internal: one VM's memory in a process of its own, for
    /// `compare-ksm --processes`.
    #[command(hide = true)]
    VmProcess(compare_processes::VmProcessArgs),
    /// List every mapping of a guest address space, read from its RAM image
    /// with the guest's paging registers: one line per page or large page
    /// (virtual address, physical address, size, permissions, flags).
    /// Entries the walk cannot use are reported on stderr.
    Maps {
        #[command(flatten)]
        guest: maps::GuestArgs,
        /// Output: text, json (JSON lines) or qemu (QEMU 7.2 `info tlb`).
        #[arg(long, value_enum, default_value_t = maps::MapsFormat::Text)]
        format: maps::MapsFormat,
        /// Same as --format json.
        #[arg(long, conflicts_with = "format")]
        json: bool,
    },
    /// Translate one guest-virtual address (hex) with the guest's paging
    /// registers, or say which fault it takes (level, entry, reason, #PF
    /// error code; exit status 3).
    Translate {
        #[command(flatten)]
        guest: maps::GuestArgs,
        /// Check a write.
        #[arg(long, conflicts_with = "fetch")]
        write: bool,
        /// Check an instruction fetch.
        #[arg(long)]
        fetch: bool,
        /// Check a user-mode (CPL 3) access.
        #[arg(long)]
        user: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// The virtual address (hex, with or without 0x).
        #[arg(value_parser = maps::parse_hex)]
        va: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Maps {
            guest,
            format,
            json,
        } => maps::run_maps(&guest, if json { maps::MapsFormat::Json } else { format }),
        Command::Translate {
            guest,
            write,
            fetch,
            user,
            json,
            va,
        } => maps::run_translate(&guest, va, maps::access(write, fetch, user), json),
        Command::Demo {
            vms,
            mib,
            no_kvm,
            processes,
            receive_migration,
            vm_process,
            socket,
        } => demo_kvm::run(&demo_kvm::DemoArgs {
            vms,
            mib,
            no_kvm,
            processes,
            receive_migration,
            vm_process: vm_process.zip(socket),
        })
        .map(|()| ExitCode::SUCCESS),
        Command::Estimate {
            json,
            fold,
            firecracker,
            firecracker_arch,
            cloud_hypervisor,
            images,
        } => estimate::run(
            &estimate::Inputs {
                images,
                firecracker,
                firecracker_arch,
                cloud_hypervisor,
            },
            json,
            fold,
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => serve::run(&args).map(|()| ExitCode::SUCCESS),
        Command::VmProcess(args) => {
            compare_processes::vm_process(&args).map(|()| ExitCode::SUCCESS)
        }
        Command::CompareKsm {
            no_ksm,
            max_map_count,
            processes: Some(n),
            mib,
            images,
        } => compare_ksm_processes(n, mib, &images, no_ksm, max_map_count),
        Command::CompareKsm {
            no_ksm,
            max_map_count,
            processes: None,
            images,
            ..
        } => {
            let allowed: Result<(), Box<dyn std::error::Error>> = if no_ksm {
                Ok(())
            } else {
                ksm::check_access().map_err(Into::into)
            };
            allowed
                .and_then(|()| {
                    if images.is_empty() {
                        Ok(vec![
                            workload::Workload::booted_clones(),
                            workload::Workload::duplicates_1g(),
                        ])
                    } else {
                        workload::Workload::images(&images)
                            .map(|w| vec![w])
                            .map_err(Into::into)
                    }
                })
                .and_then(|w| {
                    compare::run(&w, !no_ksm, (max_map_count > 0).then_some(max_map_count))
                })
                .map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            report::print_error(e.as_ref());
            ExitCode::FAILURE
        }
    }
}

/// `compare-ksm --processes N`: one workload of N VMs, the images given or
/// N synthetic clones of `mib` MiB.
fn compare_ksm_processes(
    n: usize,
    mib: usize,
    images: &[PathBuf],
    no_ksm: bool,
    max_map_count: u64,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !no_ksm {
        ksm::check_access()?;
    }
    let w = if images.is_empty() {
        let pages = (mib << 20) / pagefold::PAGE_SIZE;
        workload::Workload {
            name: format!("{n} booted clones x {mib} MiB (synthetic)"),
            vms: (0..n as u64)
                .map(|vm| (workload::Source::BootedClone { vm }, pages))
                .collect(),
        }
    } else if images.len() == n {
        workload::Workload::images(images)?
    } else {
        return Err(compare_processes::ProcessError::Count {
            n,
            images: images.len(),
        }
        .into());
    };
    compare_processes::run(&w, !no_ksm, (max_map_count > 0).then_some(max_map_count))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::{Cli, Command};
    use crate::maps::MapsFormat;

    const GUEST: [&str; 8] = [
        "--ram",
        "ram.img",
        "--cr3",
        "0x2b04000",
        "--cr4",
        "6f0",
        "--efer",
        "0xd01",
    ];

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pagefold").chain(args.iter().copied()))
    }

    #[test]
    fn maps_arguments() {
        let cli = parse(&[&["maps"][..], &GUEST[..]].concat()).unwrap();
        let Command::Maps {
            guest,
            format,
            json,
        } = cli.command
        else {
            panic!("not maps")
        };
        assert_eq!(guest.cr3, Some(0x2b0_4000));
        assert_eq!(guest.cr4, Some(0x6f0));
        assert_eq!(guest.efer, Some(0xd01));
        assert_eq!(guest.cr0, 0x8001_0001);
        assert_eq!(guest.ram_base, 0);
        assert_eq!(guest.maxphyaddr, 52);
        assert!(!guest.no_1g_pages);
        assert_eq!(format, MapsFormat::Text);
        assert!(!json);

        let cli = parse(
            &[
                &["maps"][..],
                &GUEST[..],
                &[
                    "--cr0",
                    "80050033",
                    "--ram-base",
                    "0x100000",
                    "--format",
                    "qemu",
                ],
            ]
            .concat(),
        )
        .unwrap();
        let Command::Maps { guest, format, .. } = cli.command else {
            panic!("not maps")
        };
        assert_eq!(guest.cr0, 0x8005_0033);
        assert_eq!(guest.ram_base, 0x10_0000);
        assert_eq!(format, MapsFormat::Qemu);

        // --json and --format exclude each other; registers are required
        // and must be hex.
        assert!(
            parse(&[&["maps", "--json", "--format", "text"][..], &GUEST[..]].concat()).is_err()
        );
        assert!(parse(&["maps", "--ram", "r", "--cr3", "1", "--cr4", "20"]).is_err());
        assert!(parse(&[&["maps"][..], &GUEST[..], &["--cr0", "xyz"]].concat()).is_err());

        // --arch aarch64 takes its own registers and needs them.
        let arm = [
            "maps",
            "--arch",
            "aarch64",
            "--ram",
            "r",
            "--tcr",
            "0x5b5103510",
            "--ttbr0",
            "0x4100_0000",
            "--ttbr1",
            "4200_0000",
        ];
        let Command::Maps { guest, .. } = parse(&arm).unwrap().command else {
            panic!("not maps")
        };
        assert_eq!(guest.arch(), crate::maps::ArchArg::Aarch64);
        assert_eq!(
            (guest.tcr, guest.ttbr0, guest.ttbr1, guest.cr3),
            (
                Some(0x5_b510_3510),
                Some(0x4100_0000),
                Some(0x4200_0000),
                None
            )
        );
        assert!(parse(&arm[..arm.len() - 2]).is_err());
        assert!(parse(&["maps", "--arch", "aarch64", "--ram", "r", "--cr3", "1"]).is_err());
        assert!(parse(&[&["maps", "--arch", "sparc"][..], &GUEST[1..]].concat()).is_err());
    }

    #[test]
    fn serve_and_compare_processes_arguments() {
        let cli = parse(&[
            "serve",
            "--socket",
            "/tmp/x.sock",
            "--allow-uid",
            "1000",
            "--allow-uid",
            "1001",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.socket, Some("/tmp/x.sock".into()));
        assert_eq!(args.allow_uid, [1000, 1001]);
        assert!(parse(&["serve", "--allow-uid", "me"]).is_err());

        let cli = parse(&["compare-ksm", "--processes", "2", "--mib", "8"]).unwrap();
        let Command::CompareKsm { processes, mib, .. } = cli.command else {
            panic!("not compare-ksm")
        };
        assert_eq!((processes, mib), (Some(2), 8));
        // --mib only sizes the clones of --processes.
        assert!(parse(&["compare-ksm", "--mib", "8"]).is_err());
    }

    #[test]
    fn translate_arguments() {
        let cli = parse(
            &[
                &["translate"][..],
                &GUEST[..],
                &["--write", "--user", "ffff888000001000"],
            ]
            .concat(),
        )
        .unwrap();
        let Command::Translate {
            write,
            fetch,
            user,
            json,
            va,
            ..
        } = cli.command
        else {
            panic!("not translate")
        };
        assert!(write && user && !fetch && !json);
        assert_eq!(va, 0xffff_8880_0000_1000);
        assert!(parse(
            &[
                &["translate"][..],
                &GUEST[..],
                &["--write", "--fetch", "0x1000"]
            ]
            .concat()
        )
        .is_err());
        assert!(parse(&[&["translate"][..], &GUEST[..]].concat()).is_err());
    }
}
