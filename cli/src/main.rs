//! The `pagefold` command line: a demo of the library on built-in guests,
//! and operator tools over raw guest RAM images.

mod compare;
mod demo;
mod estimate;
mod ksm;
mod workload;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

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
    },
    /// Estimate the saving of folding raw guest RAM images (for example QEMU
    /// memory-backend-file files), with the real scanner.
    Estimate {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Raw guest RAM images, one per VM.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Fold the same bytes with pagefold and with Linux KSM at its fastest,
    /// and compare (needs root for /sys/kernel/mm/ksm; every KSM setting is
    /// restored). Without images, runs the built-in workloads.
    CompareKsm {
        /// Run only pagefold's side (for profiling; prints no ratios).
        #[arg(long)]
        no_ksm: bool,
        /// Raise vm.max_map_count to this for the run (restored after); 0
        /// keeps the machine's value. Isolated merges cost the process
        /// mappings, which KSM, inside the kernel, does not need.
        #[arg(long, default_value_t = 1 << 20)]
        max_map_count: u64,
        /// Raw guest RAM images, one per VM.
        images: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { vms, mib } => demo::run(vms, mib),
        Command::Estimate { json, images } => estimate::run(&images, json),
        Command::CompareKsm {
            no_ksm,
            max_map_count,
            images,
        } => {
            let workloads = if images.is_empty() {
                Ok(vec![
                    workload::Workload::booted_clones(),
                    workload::Workload::duplicates_1g(),
                ])
            } else {
                workload::Workload::images(&images).map(|w| vec![w])
            };
            workloads.map_err(Into::into).and_then(|w| {
                compare::run(&w, !no_ksm, (max_map_count > 0).then_some(max_map_count))
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pagefold: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
