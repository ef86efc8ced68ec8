//! Interrupt routing on KVM: the GSI routing table (the in-kernel IOAPIC/PIC pins plus one MSI
//! route per device vector) and MSI-X delivery through irqfds.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so every route lives here and the table is
//! committed whole on each change. The default irqchip routes (GSI 0-15 to the PIC and IOAPIC,
//! 16-23 to the IOAPIC) are what KVM installs with KVM_CREATE_IRQCHIP; they are kept so that
//! legacy lines (the serial port) go on working once MSI routes are added.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use devices::interrupt::{MsiInterruptGroup, MsiMessage, MsiSink};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs 0-23 are the IOAPIC's pins; MSI routes are allocated above them.
const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
const MAX_GSI: u32 = 4096;

struct Table {
    entries: BTreeMap<(u32, u32), kvm_irq_routing_entry>,
    free: Vec<u32>,
    next: u32,
}

/// The VM's GSI routing table.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl GsiRouter {
    /// The router of `vm`, starting from KVM's default irqchip routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        let mut entries = BTreeMap::new();
        for gsi in 0..24 {
            if gsi < 16 {
                let (chip, pin) = if gsi < 8 {
                    (KVM_IRQCHIP_PIC_MASTER, gsi)
                } else {
                    (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
                };
                entries.insert((gsi, 0), irqchip_entry(gsi, chip, pin));
            }
            entries.insert((gsi, 1), irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        GsiRouter {
            vm,
            table: Mutex::new(Table {
                entries,
                free: Vec::new(),
                next: FIRST_MSI_GSI,
            }),
        }
    }

    fn commit(&self, table: &Table) -> io::Result<()> {
        let mut routing = KvmIrqRouting::new(table.entries.len())
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        for (slot, entry) in routing
            .as_mut_slice()
            .iter_mut()
            .zip(table.entries.values())
        {
            *slot = *entry;
        }
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| io::Error::other(format!("KVM_SET_GSI_ROUTING: {e}")))
    }

    fn allocate(&self) -> io::Result<u32> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(gsi) = t.free.pop() {
            return Ok(gsi);
        }
        if t.next >= MAX_GSI {
            return Err(io::Error::other("out of GSIs for MSI routes"));
        }
        t.next += 1;
        Ok(t.next - 1)
    }

    fn set_msi(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        // A message the machine must not deliver takes the route away, as a masked vector's
        // does, and is refused to the caller, who counts it against the guest.
        let refusal = message.and_then(|m| m.refusal());
        let message = message.filter(|_| refusal.is_none());
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Some(m) => {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = m.address as u32;
                e.u.msi.address_hi = (m.address >> 32) as u32;
                e.u.msi.data = m.data;
                let same = |old: &kvm_irq_routing_entry| {
                    if old.type_ != KVM_IRQ_ROUTING_MSI {
                        return false;
                    }
                    // SAFETY: both entries are MSI routes (type checked above for `old`, set
                    // above for `e`), so `msi` is the union member that was written.
                    let (a, b) = unsafe { (old.u.msi, e.u.msi) };
                    (a.address_lo, a.address_hi, a.data) == (b.address_lo, b.address_hi, b.data)
                };
                if t.entries.get(&(gsi, 0)).is_some_and(same) {
                    return Ok(());
                }
                t.entries.insert((gsi, 0), e);
            }
            None => {
                if t.entries.remove(&(gsi, 0)).is_some() {
                    self.commit(&t)?;
                }
                return match refusal {
                    Some(why) => Err(io::Error::new(io::ErrorKind::InvalidInput, why)),
                    None => Ok(()),
                };
            }
        }
        self.commit(&t)
    }

    fn release(&self, gsi: u32) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.entries.remove(&(gsi, 0)).is_some() {
            if let Err(e) = self.commit(&t) {
                log::warn!("releasing GSI {gsi}: {e}");
            }
        }
        t.free.push(gsi);
    }
}

/// MSI-X vectors of one device: an irqfd per vector on its own GSI, whose MSI route follows what
/// the guest programs into the device's MSI-X table.
pub struct KvmMsiGroup {
    router: Arc<GsiRouter>,
    vectors: Vec<(u32, EventFd)>,
}

impl KvmMsiGroup {
    /// `count` vectors, each with a GSI and an irqfd registered on it.
    pub fn new(router: Arc<GsiRouter>, count: u16) -> io::Result<Self> {
        let mut group = KvmMsiGroup {
            router,
            vectors: Vec::with_capacity(usize::from(count)),
        };
        for _ in 0..count {
            let gsi = group.router.allocate()?;
            let evt = EventFd::new(EFD_NONBLOCK)?;
            if let Err(e) = group.router.vm.register_irqfd(&evt, gsi) {
                group.router.release(gsi);
                return Err(io::Error::other(format!("KVM_IRQFD: {e}")));
            }
            group.vectors.push((gsi, evt));
        }
        Ok(group)
    }
}

impl MsiInterruptGroup for KvmMsiGroup {
    fn update(&self, vector: u16, message: MsiMessage, enabled: bool) -> io::Result<()> {
        let Some((gsi, _)) = self.vectors.get(usize::from(vector)) else {
            return Ok(());
        };
        self.router.set_msi(*gsi, enabled.then_some(message))
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some((_, evt)) => evt.write(1),
            None => Ok(()),
        }
    }
}

/// A single-vector MSI source (a root port's hot-plug interrupt): the route follows the message
/// the guest programmed, then the vector's irqfd fires.
pub struct KvmMsiSink(pub KvmMsiGroup);

impl MsiSink for KvmMsiSink {
    fn send(&self, message: MsiMessage) -> io::Result<()> {
        self.0.update(0, message, true)?;
        self.0.trigger(0)
    }
}

impl Drop for KvmMsiGroup {
    fn drop(&mut self) {
        for (gsi, evt) in self.vectors.drain(..) {
            if let Err(e) = self.router.vm.unregister_irqfd(&evt, gsi) {
                log::warn!("unregistering the irqfd of GSI {gsi}: {e}");
            }
            self.router.release(gsi);
        }
    }
}
