//! The hot-plug control plane on its own: a VMM's commands and its guest's answers go in, the
//! actions to carry out come out. Here the "VMM" only prints them and plays a guest whose
//! pciehp answers an attention button as Linux does; a real VMM would plug the device, press
//! the button on its root port model, and release the device when told to.
//!
//! Run with `cargo run -p hotplug-vmm-devices --example hotplug_control`.

use std::time::Duration;

use hotplug_vmm_devices::acpi_hotplug::AcpiBusState;
use hotplug_vmm_devices::hotplug::{
    Action, Command, DeviceAdd, Event, GuestEvent, HotplugControl, Options, PortMode, PortSlotView,
    SlotRegisters, Topology,
};
use hotplug_vmm_devices::pci::{Indicator, SlotEvent, SlotNotifications};
use hotplug_vmm_devices::virtio::block::ImageFormat;

/// The guest's side of the one root port's slot, as the registers would show it.
struct Registers(PortSlotView);

impl SlotRegisters for Registers {
    fn port_slot(&self, port: u8) -> Option<PortSlotView> {
        (port == 0).then_some(self.0)
    }
    fn acpi_bus(&self, _select: u8) -> Option<AcpiBusState> {
        None
    }
}

fn run(step: &str, actions: Vec<Action>) -> Vec<Action> {
    println!("{step}:");
    for a in &actions {
        println!("  {a:?}");
    }
    actions
}

fn main() {
    let ms = Duration::from_millis;
    let mut control = HotplugControl::new(
        Topology::new(&[PortMode::Native], false),
        Options::default(),
    );
    // pciehp bound to rp0 and enabled its notifications; the slot is empty.
    let mut regs = Registers(PortSlotView {
        present: false,
        powered: false,
        power_indicator: Indicator::Off,
        notifications: SlotNotifications {
            hot_plug_interrupt: true,
            attention_button: true,
            link_state: true,
            ..Default::default()
        },
        attention_pressed: false,
        msi_enabled: true,
    });

    let open = Command::BlockdevAdd {
        node: "disk0".into(),
        path: "/tmp/disk0.qcow2".into(),
        readonly: false,
        format: ImageFormat::Qcow2,
    };
    run("blockdev-add", control.command(ms(0), open, &regs).unwrap());
    let add = Command::DeviceAdd(DeviceAdd {
        id: "d0".into(),
        drive: "disk0".into(),
        bus: Some("rp0".parse().unwrap()),
        addr: None,
        remove_on_backend_error: None,
    });
    run("device_add", control.command(ms(10), add, &regs).unwrap());
    // The VMM carried out Plug; the guest brought the slot up.
    regs.0.present = true;
    regs.0.powered = true;
    regs.0.power_indicator = Indicator::On;

    // The backend outlives its device.
    let close = Command::BlockdevDel {
        node: "disk0".into(),
    };
    match control.command(ms(20), close.clone(), &regs) {
        Err(e) => println!("blockdev-del refused: {e}"),
        Ok(_) => unreachable!("the node is in use"),
    }

    run(
        "device_del",
        control.command(ms(1000), del(), &regs).unwrap(),
    );
    // pciehp acknowledges the press and blinks for 5 s: a second request is refused.
    regs.0.power_indicator = Indicator::Blinking;
    println!(
        "device_del again: {}",
        control.command(ms(1500), del(), &regs).unwrap_err()
    );
    // It powers the slot off, waits a second and turns the indicator off: only then does the
    // device go.
    let slot = |port, event| GuestEvent::SlotControl { port, event };
    run(
        "guest: power off",
        control.guest_event(ms(6000), slot(0, SlotEvent::PowerOff)),
    );
    let actions = run(
        "guest: power indicator off",
        control.guest_event(ms(7000), slot(0, SlotEvent::PowerIndicator(Indicator::Off))),
    );
    assert!(actions.contains(&Action::Emit(Event::DeviceDeleted { id: "d0".into() })));
    run(
        "blockdev-del",
        control.command(ms(7100), close, &regs).unwrap(),
    );
    assert!(control.functions().next().is_none() && control.nodes().is_empty());
}

fn del() -> Command {
    Command::DeviceDel { id: "d0".into() }
}
