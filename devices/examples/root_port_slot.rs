//! A PCI Express root port's hot-plug slot driven the way Linux's pciehp drives it, through the
//! port's configuration space, with an MSI sink that counts interrupts:
//!
//! 1. the driver binds: MSI programmed and enabled, notifications enabled in Slot Control;
//! 2. the VMM inserts a card: Presence Detect and Data Link Layer State Changed, one MSI;
//! 3. the driver powers the slot and turns the power indicator on;
//! 4. the VMM presses the attention button (a graceful removal): one MSI;
//! 5. the driver blinks, powers the slot off and turns the indicator off;
//! 6. the VMM takes the card out.
//!
//! Run with `cargo run -p hotplug-vmm-devices --example root_port_slot`.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hotplug_vmm_devices::interrupt::{MsiMessage, MsiSink};
use hotplug_vmm_devices::pci::root_port::{
    MSI_ADDRESS_HIGH, MSI_ADDRESS_LOW, MSI_CONTROL_ENABLE, MSI_DATA_64, MSI_MESSAGE_CONTROL,
    PCI_EXP_SLTCTL, PCI_EXP_SLTSTA,
};
use hotplug_vmm_devices::pci::slot::*;
use hotplug_vmm_devices::pci::{PciDevice, PcieRootPort, RootPortOptions, SlotEvent, SlotObserver};

/// Counts the MSIs the port sends.
#[derive(Default)]
struct CountingMsi(AtomicUsize);

impl MsiSink for CountingMsi {
    fn send(&self, message: MsiMessage) -> io::Result<()> {
        println!(
            "  MSI #{} to {:#x} data {:#x}",
            self.0.fetch_add(1, Ordering::SeqCst) + 1,
            message.address,
            message.data
        );
        Ok(())
    }
}

/// Records what the guest's Slot Control commands did (a VMM would queue them for a thread
/// of its own: the port is locked while it calls).
#[derive(Default)]
struct EventLog(Mutex<Vec<SlotEvent>>);

impl SlotObserver for EventLog {
    fn slot_event(&self, _port_id: &str, event: SlotEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// The guest's configuration space accesses.
struct Guest<'a>(&'a mut PcieRootPort);

impl Guest<'_> {
    fn read16(&mut self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.0.config_read(offset, &mut b);
        u16::from_le_bytes(b)
    }
    // A root port has no BARs: no write of the guest's reprograms one.
    fn write16(&mut self, offset: u16, value: u16) {
        assert!(self.0.config_write(offset, &value.to_le_bytes()).is_empty());
    }
    fn write32(&mut self, offset: u16, value: u32) {
        assert!(self.0.config_write(offset, &value.to_le_bytes()).is_empty());
    }
    fn slot_control(&mut self, set: u16, mask: u16) {
        let at = self.0.pcie_capability_offset() + PCI_EXP_SLTCTL;
        let ctl = self.read16(at);
        self.write16(at, (ctl & !mask) | (set & mask));
    }
    fn set_power_indicator(&mut self, i: Indicator) {
        self.slot_control(i.bits() << SLTCTL_PIC_SHIFT, SLTCTL_PIC);
    }
    /// pciehp's interrupt handler: read Slot Status, write the events back until none is left.
    fn isr(&mut self) -> u16 {
        let at = self.0.pcie_capability_offset() + PCI_EXP_SLTSTA;
        let mut seen = 0;
        loop {
            let events = self.read16(at) & SLTSTA_EVENTS;
            if events == 0 {
                return seen;
            }
            seen |= events;
            self.write16(at, events);
        }
    }
}

fn show(step: &str, port: &mut PcieRootPort, log: &EventLog) -> Vec<SlotEvent> {
    let events: Vec<SlotEvent> = log.0.lock().unwrap().drain(..).collect();
    let s = port.slot();
    println!(
        "{step}: present {} powered {} link {} power indicator {}; slot events {events:?}",
        s.is_present(),
        s.is_powered(),
        s.is_link_active(),
        s.power_indicator()
    );
    events
}

fn main() {
    let msi = Arc::new(CountingMsi::default());
    let mut port = PcieRootPort::new("rp0", 0, RootPortOptions::default(), msi.clone());
    let log = Arc::new(EventLog::default());
    port.set_observer(Some(log.clone()));
    let msis = || msi.0.load(Ordering::SeqCst);

    // 1. pciehp binds: MSI first (the port driver), then the notifications it uses with an
    //    attention button present; the enabling command completes (Command Completed).
    let mut g = Guest(&mut port);
    let cap = g.0.msi_capability_offset();
    g.write32(cap + MSI_ADDRESS_LOW, 0xfee0_0000);
    g.write32(cap + MSI_ADDRESS_HIGH, 0);
    g.write16(cap + MSI_DATA_64, 0x4041);
    let ctl = g.read16(cap + MSI_MESSAGE_CONTROL);
    g.write16(cap + MSI_MESSAGE_CONTROL, ctl | MSI_CONTROL_ENABLE);
    let enables = SLTCTL_DLLSCE | SLTCTL_ABPE | SLTCTL_CCIE | SLTCTL_HPIE;
    g.slot_control(enables, enables);
    assert_eq!(g.isr(), SLTSTA_CC);
    show("1. pciehp bound", &mut port, &log);
    assert!(port.slot().is_armed() && msis() == 1);

    // 2. Hot-add.
    port.insert_card().expect("empty slot");
    let events = Guest(&mut port).isr();
    assert_eq!(events, SLTSTA_PDC | SLTSTA_DLLSC);
    println!("   guest saw Slot Status {events:#06x} (PDC, DLLSC)");
    show("2. card inserted", &mut port, &log);
    assert_eq!(msis(), 2);

    // 3. board_added: power on, blink while probing, then on.
    let mut g = Guest(&mut port);
    g.slot_control(
        Indicator::Blinking.bits() << SLTCTL_PIC_SHIFT,
        SLTCTL_PCC | SLTCTL_PIC,
    );
    g.set_power_indicator(Indicator::On);
    g.isr();
    let events = show("3. guest enabled the slot", &mut port, &log);
    assert_eq!(events[0], SlotEvent::PowerOn);

    // 4. device_del: the attention button.
    port.press_attention_button();
    assert_eq!(Guest(&mut port).isr(), SLTSTA_ABP);
    show("4. attention button pressed", &mut port, &log);

    // 5. pciehp blinks for its 5 s grace period, then powers off and turns the indicator off.
    let mut g = Guest(&mut port);
    g.set_power_indicator(Indicator::Blinking);
    g.slot_control(SLTCTL_PCC, SLTCTL_PCC);
    g.set_power_indicator(Indicator::Off);
    g.isr();
    let events = show("5. guest powered the slot off", &mut port, &log);
    assert!(events.contains(&SlotEvent::PowerOff));
    assert!(events.contains(&SlotEvent::PowerIndicator(Indicator::Off)));

    // 6. Only now does the VMM release the device and take the card out. No MSI: with an
    //    attention button pciehp enables Attention Button Pressed, not Presence Detect Changed,
    //    and the link already went down (and was reported) at the power-off.
    port.remove_card().expect("a card");
    assert_eq!(Guest(&mut port).isr(), SLTSTA_PDC);
    show("6. card removed", &mut port, &log);
    assert_eq!(msis(), 5);
    println!("{} MSIs in all", msis());
}
