//! Checks the generated tables with ACPICA's own tools (Debian package
//! `acpica-tools`): `iasl -d` must decode every table without complaint, the
//! decoded tables must compile back with `iasl` without errors or warnings
//! (and, for the data tables, to the very same bytes), and `acpiexec` must run
//! the host bridge's `_OSC` with the results the module documentation
//! promises.
//!
//! These tests fail, rather than skip, when the tools are missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hotplug_vmm_acpi::host_bridge::{
    OSC_CDW1_CAPABILITIES_MASKED, OSC_CDW1_FAILURE, OSC_CDW1_QUERY, OSC_CDW1_UNRECOGNIZED_REVISION,
    OSC_CDW1_UNRECOGNIZED_UUID,
};
use hotplug_vmm_acpi::{
    build_tables, table_name, AcpiHotplugBus, AcpiSlot, HostBridgeConfig, MachineConfig, OscConfig,
    PciHotplugConfig, SlotParent,
};

const REPORT_PORT: u16 = 0x610;

fn sample_config(grant_native_hotplug: bool) -> MachineConfig {
    MachineConfig {
        cpus: 2,
        pci: HostBridgeConfig {
            osc: OscConfig {
                grant_native_hotplug,
                report_port: Some(REPORT_PORT),
            },
            ..Default::default()
        },
        pci_hotplug: Some(PciHotplugConfig {
            port: HOTPLUG_PORT,
            gsi: 5,
            buses: vec![
                AcpiHotplugBus {
                    parent: SlotParent::RootBus,
                    slots: (1..16)
                        .map(|d| AcpiSlot {
                            device: d,
                            sun: 32 + u32::from(d),
                        })
                        .collect(),
                },
                AcpiHotplugBus {
                    parent: SlotParent::RootPort {
                        index: 2,
                        device: 0x12,
                        function: 0,
                    },
                    slots: vec![AcpiSlot { device: 0, sun: 2 }],
                },
            ],
        }),
        ..Default::default()
    }
}

const HOTPLUG_PORT: u16 = 0x620;

/// A fresh, empty scratch directory under cargo's per-target temp dir; the
/// tests remove it when they pass and leave it behind when they fail.
fn scratch_dir(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("acpi-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes every table as `<SIG>.dat` into `dir`; returns the names.
fn write_tables(cfg: &MachineConfig, dir: &Path) -> Vec<String> {
    let tables = build_tables(cfg, hotplug_vmm_acpi::DEFAULT_TABLES_BASE).unwrap();
    tables
        .iter()
        .map(|(_, blob)| {
            let name = table_name(blob);
            fs::write(dir.join(format!("{name}.dat")), blob).unwrap();
            name
        })
        .collect()
}

/// Runs an ACPICA tool in `dir`; panics (failing the test) if it cannot be
/// started.
fn run(dir: &Path, tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{tool}` ({e}); install ACPICA's tools (Debian: apt-get install acpica-tools)"
            )
        })
}

fn text(out: &Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mentions_problem(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    s.contains("error") || s.contains("warning") || s.contains("****")
}

/// Parses iasl's "N Errors, N Warnings, N Remarks" summary line.
fn summary(out: &Output) -> (u32, u32, u32) {
    let all = text(out);
    let line = all
        .lines()
        .find(|l| l.contains(" Errors, ") && l.contains(" Warnings"))
        .unwrap_or_else(|| panic!("no iasl summary line in:\n{all}"));
    let count = |word: &str| -> u32 {
        let before = &line[..line
            .find(word)
            .unwrap_or_else(|| panic!("no `{word}` in `{line}`"))];
        before
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot parse the number of {word} in `{line}`"))
    };
    (count(" Errors"), count(" Warnings"), count(" Remarks"))
}

/// `iasl -d NAME.dat` must succeed without any error or warning, in its
/// output or in the decoded file; returns the decoded text.
fn disassemble(dir: &Path, name: &str) -> String {
    let dat = format!("{name}.dat");
    let out = run(dir, "iasl", &["-d", &dat]);
    let all = text(&out);
    assert!(out.status.success(), "iasl -d {dat} failed:\n{all}");
    assert!(!mentions_problem(&all), "iasl -d {dat} complained:\n{all}");
    let dsl = fs::read_to_string(dir.join(format!("{name}.dsl")))
        .unwrap_or_else(|e| panic!("iasl -d {dat} wrote no {name}.dsl ({e}):\n{all}"));
    let bad: Vec<&str> = dsl.lines().filter(|l| mentions_problem(l)).collect();
    assert!(bad.is_empty(), "{name}.dsl has complaints: {bad:#?}\n{all}");
    dsl
}

/// Compiles `NAME.dsl` back with iasl, requiring 0 errors and 0 warnings;
/// returns the compiled bytes and the number of remarks.
fn recompile(dir: &Path, name: &str) -> (Vec<u8>, u32) {
    let dsl = format!("{name}.dsl");
    let out = run(dir, "iasl", &[&dsl]);
    let all = text(&out);
    let (errors, warnings, remarks) = summary(&out);
    assert!(
        out.status.success() && errors == 0 && warnings == 0,
        "iasl {dsl}: {errors} errors, {warnings} warnings:\n{all}"
    );
    if remarks != 0 {
        println!("iasl {dsl}: {remarks} remarks:\n{all}");
    }
    let aml = fs::read(dir.join(format!("{name}.aml")))
        .unwrap_or_else(|e| panic!("iasl {dsl} wrote no {name}.aml ({e}):\n{all}"));
    (aml, remarks)
}

/// Bytes of a standard-header table that iasl's data table compiler sets
/// itself: the checksum and the compiler ID/revision.
fn same_but_compiler_fields(ours: &[u8], iasl: &[u8]) -> bool {
    ours.len() == iasl.len()
        && ours
            .iter()
            .zip(iasl)
            .enumerate()
            .all(|(i, (a, b))| a == b || i == 9 || (28..36).contains(&i))
}

/// iasl 20200925 cannot disassemble a binary RSDP (it has no standard table
/// header, which iasl's binary file detection requires). If `iasl -d` fails
/// for exactly that reason, check the RSDP the other way round: decode it
/// here into iasl's data table source format, compile that with iasl (which
/// computes both checksums itself) and require the very same 36 bytes.
fn check_rsdp(dir: &Path, rsdp: &[u8]) {
    let out = run(dir, "iasl", &["-d", "RSDP.dat"]);
    let all = text(&out);
    if out.status.success() {
        assert!(
            !mentions_problem(&all),
            "iasl -d RSDP.dat complained:\n{all}"
        );
        return;
    }
    assert!(
        all.contains("does not contain a valid ACPI table"),
        "iasl -d RSDP.dat failed for an unexpected reason:\n{all}"
    );
    assert_eq!(rsdp.len(), 36);
    let u32_at = |o: usize| u32::from_le_bytes(rsdp[o..o + 4].try_into().unwrap());
    let source = format!(
        "[0008]                          Signature : \"{}\"\n\
         [0001]                           Checksum : 00\n\
         [0006]                             Oem ID : \"{}\"\n\
         [0001]                           Revision : {:02X}\n\
         [0004]                       RSDT Address : {:08X}\n\
         [0004]                             Length : {:08X}\n\
         [0008]                       XSDT Address : {:016X}\n\
         [0001]                  Extended Checksum : 00\n\
         [0003]                           Reserved : 000000\n",
        String::from_utf8_lossy(&rsdp[0..8]),
        String::from_utf8_lossy(&rsdp[9..15]),
        rsdp[15],
        u32_at(16),
        u32_at(20),
        u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
    );
    fs::write(dir.join("RSDP.dsl"), source).unwrap();
    let (aml, _) = recompile(dir, "RSDP");
    assert_eq!(aml, rsdp, "iasl encodes our RSDP's fields differently");
}

#[test]
fn iasl_decodes_and_recompiles_every_table() {
    let dir = scratch_dir("iasl");
    let cfg = sample_config(true);
    let names = write_tables(&cfg, &dir);
    assert_eq!(names, ["RSDP", "XSDT", "FACP", "APIC", "MCFG", "DSDT"]);

    for name in &names {
        let ours = fs::read(dir.join(format!("{name}.dat"))).unwrap();
        match name.as_str() {
            "RSDP" => check_rsdp(&dir, &ours),
            "DSDT" => {
                let dsl = disassemble(&dir, name);
                for needle in [
                    "Device (PCI0)",
                    "EisaId (\"PNP0A08\")",
                    "EisaId (\"PNP0A03\")",
                    "Method (_OSC, 4, Serialized)",
                    "33db4d5b-1ff7-401c-9657-7441c03dd766",
                    "Name (_PRT, Package (0x80)",
                    "EisaId (\"PNP0C02\")",
                    "Name (_S5, Package (0x04)",
                    "WordBusNumber",
                    "QWordMemory",
                    "OperationRegion (PHPR, SystemIO, 0x0620, 0x18)",
                    "Local3 = PPND",
                    "Device (SL01)",
                    "Device (SL0F)",
                    "Device (RP02)",
                    "Name (_SUN, 0x2F)",
                    "Method (_EJ0, 1, NotSerialized)",
                    "Notify (\\_SB.PCI0.SL0F, 0x03)",
                    "Notify (\\_SB.PCI0.RP02.SL00, One)",
                    "Notify (\\_SB.PCI0, Zero)",
                    "Notify (\\_SB.PCI0.RP02, Zero)",
                    "Name (_HID, \"ACPI0013\"",
                    "Method (_EVT, 1, Serialized)",
                    "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
                ] {
                    assert!(dsl.contains(needle), "DSDT.dsl lacks `{needle}`:\n{dsl}");
                }
                let (_, remarks) = recompile(&dir, name);
                println!("DSDT recompiled: 0 errors, 0 warnings, {remarks} remarks");
            }
            _ => {
                disassemble(&dir, name);
                let (aml, _) = recompile(&dir, name);
                assert!(
                    same_but_compiler_fields(&ours, &aml),
                    "iasl re-encodes {name} differently:\nours: {ours:02x?}\niasl: {aml:02x?}"
                );
            }
        }
    }
    // Kept on failure (the asserts above panic first) for inspection.
    let _ = fs::remove_dir_all(&dir);
}

/// Runs acpiexec's batch `commands` on the machine tables in `dir` (and `extra` tables, e.g.
/// a test SSDT); fails the test unless it succeeds without complaint. Returns its standard
/// output and everything it printed (for failure messages).
fn acpiexec(dir: &Path, commands: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "-b", commands, "FACP.dat", "APIC.dat", "MCFG.dat", "DSDT.dat",
    ];
    args.extend_from_slice(extra);
    let out = run(dir, "acpiexec", &args);
    let all = text(&out);
    assert!(out.status.success(), "acpiexec failed:\n{all}");
    assert!(!mentions_problem(&all), "acpiexec complained:\n{all}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), all)
}

/// Parses the value acpiexec prints after `Evaluating PATH`: the bytes of a
/// `[Buffer]` or the value of an `[Integer]`.
fn acpiexec_result(out: &str, index: usize) -> Vec<u8> {
    let section = out
        .split("Evaluating ")
        .nth(index + 1)
        .unwrap_or_else(|| panic!("no evaluation #{index} in acpiexec output:\n{out}"));
    let line = section
        .lines()
        .find(|l| l.contains("[Buffer]") || l.contains("[Integer]"))
        .unwrap_or_else(|| panic!("no result for evaluation #{index}:\n{section}"));
    if let Some(hex) = line.split("[Integer] = ").nth(1) {
        let v = u64::from_str_radix(hex.trim(), 16).unwrap();
        return v.to_le_bytes().to_vec();
    }
    let hex = line
        .split("0000:")
        .nth(1)
        .unwrap()
        .split("//")
        .next()
        .unwrap();
    hex.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn dwords(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn buffer_arg(dwords: &[u32]) -> String {
    let bytes: Vec<String> = dwords
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("({})", bytes.join(" "))
}

const PCI_UUID_BYTES: &str = "(5b 4d db 33 f7 1f 1c 40 96 57 74 41 c0 3d d7 66)";

/// Runs `_OSC` in acpiexec (ACPICA's interpreter, the one Linux uses) on the
/// generated tables.
fn check_osc(grant_native_hotplug: bool) {
    let dir = scratch_dir(&format!("acpiexec-{grant_native_hotplug}"));
    write_tables(&sample_config(grant_native_hotplug), &dir);
    let allowed = if grant_native_hotplug { 0x3D } else { 0x3C };
    // What Linux 6.x asks for with every option on: PCIe hotplug, SHPC
    // hotplug, PME, AER, PCIe capability, LTR and DPC.
    let linux_request = 0xBF;
    // Linux's support field: extended config, ASPM, clock PM, segments, MSI...
    let support = 0x1F;

    let osc = "\\_SB.PCI0._OSC";
    let commands = [
        // 0: Linux's query.
        format!(
            "evaluate {osc} {PCI_UUID_BYTES} 1 3 {}",
            buffer_arg(&[OSC_CDW1_QUERY, support, linux_request])
        ),
        // 1, 2: the report registers.
        "evaluate \\_SB.PCI0.OREQ".to_string(),
        "evaluate \\_SB.PCI0.OGNT".to_string(),
        // 3, 4: CDW1 as Linux passed it (the query flag), and its support dword.
        "evaluate \\_SB.PCI0.OSTA".to_string(),
        "evaluate \\_SB.PCI0.OSUP".to_string(),
        // 5: Linux's commit of what it was offered.
        format!(
            "evaluate {osc} {PCI_UUID_BYTES} 1 3 {}",
            buffer_arg(&[0, support, allowed])
        ),
        // 6: unknown revision.
        format!(
            "evaluate {osc} {PCI_UUID_BYTES} 2 3 {}",
            buffer_arg(&[0, support, allowed])
        ),
        // 7: unknown UUID.
        format!(
            "evaluate {osc} (00 11 22 33 44 55 66 77 88 99 aa bb cc dd ee ff) 1 3 {}",
            buffer_arg(&[0, support, allowed])
        ),
        // 8: no control dword.
        format!(
            "evaluate {osc} {PCI_UUID_BYTES} 1 2 {}",
            buffer_arg(&[0, support])
        ),
        // 9: \_S5.
        "evaluate \\_S5_".to_string(),
    ];
    let (stdout, all) = acpiexec(&dir, &commands.join("; "), &[]);
    let result = |i| dwords(&acpiexec_result(&stdout, i));

    assert_eq!(
        result(0),
        [
            OSC_CDW1_QUERY | OSC_CDW1_CAPABILITIES_MASKED,
            support,
            allowed
        ],
        "query\n{all}"
    );
    assert_eq!(result(1)[0], linux_request, "OREQ\n{all}");
    assert_eq!(result(2)[0], allowed, "OGNT\n{all}");
    assert_eq!(result(3)[0], OSC_CDW1_QUERY, "OSTA\n{all}");
    assert_eq!(result(4)[0], support, "OSUP\n{all}");
    assert_eq!(result(5), [0, support, allowed], "commit\n{all}");
    assert_eq!(
        result(6),
        [
            OSC_CDW1_UNRECOGNIZED_REVISION | OSC_CDW1_CAPABILITIES_MASKED,
            support,
            0
        ],
        "unknown revision\n{all}"
    );
    assert_eq!(
        result(7),
        [OSC_CDW1_UNRECOGNIZED_UUID, support, allowed],
        "unknown UUID\n{all}"
    );
    assert_eq!(
        result(8),
        [OSC_CDW1_FAILURE, support],
        "short buffer\n{all}"
    );
    let s5 = stdout.split("Evaluating \\_S5_").nth(1).unwrap();
    assert!(
        s5.contains("[Package] Contains 4 Elements:")
            && s5.contains("[Integer] = 0000000000000005"),
        "\\_S5:\n{all}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn acpiexec_osc_grants_native_hotplug() {
    check_osc(true);
}

#[test]
fn acpiexec_osc_withholds_native_hotplug() {
    check_osc(false);
}

/// Runs the ACPI hot-plug methods in acpiexec: a slot's `_EJ0` selects its bus and writes its
/// bit to the eject register, and the GED's `_EVT` runs without complaint.
/// (acpiexec backs SystemIO with plain memory, so a register reads what was last written.)
#[test]
fn acpiexec_ej0_selects_the_bus_and_writes_the_eject_register() {
    let dir = scratch_dir("acpiexec-ej0");
    write_tables(&sample_config(true), &dir);
    let commands = [
        "evaluate \\_SB.PCI0.SL03._EJ0 1",
        "evaluate \\_SB.PCI0.PSEL",
        "evaluate \\_SB.PCI0.PEJ0",
        "evaluate \\_SB.PCI0.RP02.SL00._EJ0 1",
        "evaluate \\_SB.PCI0.PSEL",
        "evaluate \\_SB.PCI0.PEJ0",
        "evaluate \\_SB.GED_._EVT 5",
        "evaluate \\_SB.PCI0.PSEL",
    ];
    let (stdout, all) = acpiexec(&dir, &commands.join("; "), &[]);
    let value = |i| dwords(&acpiexec_result(&stdout, i))[0];
    assert_eq!((value(1), value(2)), (0, 1 << 3), "root bus slot 3\n{all}");
    assert_eq!((value(4), value(5)), (1, 1), "rp2's slot\n{all}");
    // With no bus pending _EVT selects none (tests below give it work).
    assert_eq!(value(7), 1, "after _EVT\n{all}");
    let _ = fs::remove_dir_all(&dir);
}

/// An SSDT with `\TSET (pending, insert, remove, bus_check)`, which stores its arguments into
/// the hot-plug registers that acpiexec backs with memory: the VMM's side of an event.
const TSET_ASL: &str = r#"DefinitionBlock ("", "SSDT", 2, "HPVMM", "PSCNTEST", 1)
{
    External (\_SB.PCI0.PPND, FieldUnitObj)
    External (\_SB.PCI0.PINS, FieldUnitObj)
    External (\_SB.PCI0.PREM, FieldUnitObj)
    External (\_SB.PCI0.PBCK, FieldUnitObj)
    Method (\TSET, 4)
    {
        \_SB.PCI0.PPND = Arg0
        \_SB.PCI0.PINS = Arg1
        \_SB.PCI0.PREM = Arg2
        \_SB.PCI0.PBCK = Arg3
    }
}
"#;

/// Runs `\TSET` and `PSCN` in acpiexec for each `(pending, insert, remove, bus_check)`; returns,
/// per run, the notifications as sorted "NAME value" strings (acpiexec names only an object's
/// last segment, and dispatches notifications in no fixed order).
fn pscn_notifications(cfg: &MachineConfig, name: &str, runs: &[[u32; 4]]) -> Vec<Vec<String>> {
    let dir = scratch_dir(name);
    write_tables(cfg, &dir);
    fs::write(dir.join("tset.asl"), TSET_ASL).unwrap();
    let out = run(&dir, "iasl", &["tset.asl"]);
    assert!(out.status.success(), "iasl tset.asl:\n{}", text(&out));
    let batch: Vec<String> = runs
        .iter()
        .map(|[p, i, r, b]| {
            format!("evaluate \\TSET {p:#x} {i:#x} {r:#x} {b:#x}; evaluate \\_SB.PCI0.PSCN")
        })
        .collect();
    let (stdout, all) = acpiexec(&dir, &batch.join("; "), &["tset.aml"]);
    let sections: Vec<&str> = stdout.split("Evaluating \\_SB.PCI0.PSCN").skip(1).collect();
    assert_eq!(sections.len(), runs.len(), "{all}");
    let _ = fs::remove_dir_all(&dir);
    sections
        .iter()
        .map(|sec| {
            let mut seen: Vec<String> = sec
                .lines()
                .filter_map(|l| {
                    let (_, rest) = l.split_once("Received a System Notify on [")?;
                    let (obj, rest) = rest.split_once(']')?;
                    let value = rest.split("Value ").nth(1)?.split_whitespace().next()?;
                    Some(format!("{obj} {value}"))
                })
                .collect();
            seen.sort();
            seen
        })
        .collect()
}

/// The GED's event method notifies exactly the slots whose bits are pending, with the right
/// notification, and only on the buses the pending register names.
#[test]
fn acpiexec_event_method_notifies_only_pending_slots_on_pending_buses() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let got = pscn_notifications(
        &sample_config(true),
        "acpiexec-pscn",
        &[
            // Bus 1 (rp2's slot, device 0) pending; bus 0's bits are there but not its turn.
            [0b10, 0b1001, 0b100, 0],
            // Bus 0: inserts into slots 1, 7, 8 and 15, an eject request for slot 2.
            [0b01, 0x8182, 0b100, 0],
            // Nothing pending: nothing notified, whatever the other registers hold.
            [0, 0xffff, 0xffff, 0xffff],
            // A vanished device on bus 1: Bus Check on its root port.
            [0b10, 0, 0, 1],
            // Both buses: each reads the same (memory-backed) registers.
            [0b11, 0b1000, 0, 0],
        ],
    );
    assert_eq!(got[0], names(&["SL00 0x01"]));
    assert_eq!(
        got[1],
        names(&[
            "SL01 0x01",
            "SL02 0x03",
            "SL07 0x01",
            "SL08 0x01",
            "SL0F 0x01"
        ])
    );
    assert!(got[2].is_empty(), "{:?}", got[2]);
    assert_eq!(got[3], names(&["RP02 0x00"]));
    assert_eq!(got[4], names(&["SL03 0x01"]));
}

/// Buses from 32 on have no bit in the pending register: the event method scans them always.
#[test]
fn acpiexec_event_method_scans_buses_past_31_unasked() {
    let mut cfg = sample_config(true);
    let hp = cfg.pci_hotplug.as_mut().unwrap();
    hp.buses.truncate(1);
    for i in 0..34u8 {
        hp.buses.push(AcpiHotplugBus {
            parent: SlotParent::RootPort {
                index: i,
                device: 16 + i / 8,
                function: i % 8,
            },
            slots: vec![AcpiSlot {
                device: 0,
                sun: u32::from(i),
            }],
        });
    }
    // 35 buses: 0 the root bus, 1..=34 the ports; 32..=34 have no pending bit.
    let got = pscn_notifications(&cfg, "acpiexec-pscn-many", &[[0, 1, 0, 0]]);
    assert_eq!(got[0], vec!["SL00 0x01".to_string(); 3]);
}
