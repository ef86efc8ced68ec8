//! The hot-plug slot of a PCI Express Downstream Port: Slot Capabilities, Slot Control and Slot
//! Status (PCI Express Base Spec 5.0 §7.5.3.9–§7.5.3.11), the Data Link Layer Link Active bit of
//! Link Status (§7.5.3.8) and the hot-plug interrupt rule (§6.7.3.4), free of configuration-space
//! plumbing and of any hypervisor.
//!
//! [`HotplugSlot`] is driven from two sides:
//!
//! - the VMM: [`HotplugSlot::insert`], [`HotplugSlot::press_attention_button`],
//!   [`HotplugSlot::surprise_remove`], [`HotplugSlot::remove_card`] (and
//!   [`HotplugSlot::cold_plug`] before the guest runs);
//! - the guest, through the port's configuration space: [`HotplugSlot::write_control`] (a
//!   command, §6.7.3.2) and [`HotplugSlot::write_status`] (write-1-to-clear).
//!
//! After each of them the owner calls [`HotplugSlot::take_interrupt`] and, if it returns true,
//! sends the port's MSI.
//!
//! # Presence, power and link
//!
//! The slot has a power controller (Slot Control bit 10, Power Controller Control: **0 = on,
//! 1 = off**) and reports Data Link Layer Link Active (DLLLA). They relate as follows:
//!
//! - [`insert`](HotplugSlot::insert) sets Presence Detect State, and brings the link up at once
//!   *whatever the power controller says*: Presence Detect Changed **and** Data Link Layer State
//!   Changed are set together, which is one interrupt if the guest enabled either. This is what
//!   QEMU does (`pcie_cap_slot_plug_cb` sets PDS and DLLLA together) and what Linux's pciehp
//!   needs: with an Attention Button present pciehp enables Attention Button Pressed instead of
//!   Presence Detect Changed notification (`pcie_enable_notification` in `pciehp_hpc.c`), so a
//!   link that waited for power would announce nothing until someone pressed the button, and
//!   the hot-add would take pciehp's 5 s button grace period. With the link up, pciehp's
//!   Data Link Layer State Changed handler (`pciehp_handle_presence_or_link_change`) runs
//!   `board_added`: it turns the power on (Power Controller Control = 0, reported as
//!   [`SlotEvent::PowerOn`]), blinks the power indicator, finds the link active
//!   (`pciehp_check_link_status`), probes the device and turns the power indicator on.
//! - A card inserted while no hot-plug driver has armed the slot (Hot-Plug Interrupt Enable
//!   clear, e.g. before the guest's pciehp has bound) is also *powered on* (Power Controller
//!   Control 0, power indicator on), like a card present at power-on. The PCI core may enumerate
//!   it before pciehp binds, and pciehp then takes the slot as enabled because its bus has a
//!   device (`pciehp_hpc.c`: `ctrl->state = ... ON_STATE`); a slot left powered off would make
//!   its later power-off command no change at all, and the removal would never complete.
//! - A guest power-off command (Power Controller Control 0 → 1) takes an active link down and
//!   sets Data Link Layer State Changed, as a real card losing power would. pciehp expects and
//!   discards exactly that event (`remove_board` ignores link and presence changes for 1 s after
//!   powering off). The card stays *present* until the VMM calls
//!   [`remove_card`](HotplugSlot::remove_card): only the VMM knows when it has released the
//!   device, which it does on [`SlotEvent::PowerOff`].
//! - A guest power-on command (1 → 0) with a card present and the link down brings the link up
//!   (Data Link Layer State Changed), e.g. after `echo 1 > /sys/bus/pci/slots/N/power`.
//! - [`surprise_remove`](HotplugSlot::surprise_remove) clears presence and the link at once and
//!   sets both change bits. pciehp answers with its own power-off command, so a VMM sees a
//!   [`SlotEvent::PowerOff`] *after* the device is already gone and must tolerate it.
//!
//! A slot built without a power controller has Power Controller Control hardwired to 0 (on);
//! the link then follows presence only.
//!
//! # Command Completed
//!
//! Every guest write to Slot Control is one command (§6.7.3.2), completed at once: Command
//! Completed is set on every write, even one that changes nothing, unless the slot advertises
//! No Command Completed Support ([`SlotCapabilities::no_command_completed`]), in which case it is
//! never set and Command Completed Interrupt Enable is hardwired to 0.
//!
//! # Interrupts (§6.7.3.4)
//!
//! An event is *pending* when its Slot Status bit is set, its enable bit in Slot Control is set
//! and Hot-Plug Interrupt Enable is set. An MSI is due when the set of pending events goes from
//! empty to non-empty — whatever caused it: an event, the guest enabling a notification while
//! its status bit is set, or the guest setting Hot-Plug Interrupt Enable. While events stay
//! pending no further MSI is sent; the guest must clear every pending status bit before the next
//! event interrupts again (Linux's `pciehp_isr` re-reads Slot Status until it is clear for this
//! reason).

use std::fmt;

// ---- Slot Capabilities (PCI Express Base Spec 5.0 §7.5.3.9) ----

/// Slot Capabilities: Attention Button Present (bit 0).
pub const SLTCAP_ABP: u32 = 1 << 0;
/// Slot Capabilities: Power Controller Present (bit 1).
pub const SLTCAP_PCP: u32 = 1 << 1;
/// Slot Capabilities: MRL Sensor Present (bit 2).
pub const SLTCAP_MRLSP: u32 = 1 << 2;
/// Slot Capabilities: Attention Indicator Present (bit 3).
pub const SLTCAP_AIP: u32 = 1 << 3;
/// Slot Capabilities: Power Indicator Present (bit 4).
pub const SLTCAP_PIP: u32 = 1 << 4;
/// Slot Capabilities: Hot-Plug Surprise (bit 5): the card may be removed without notice.
pub const SLTCAP_HPS: u32 = 1 << 5;
/// Slot Capabilities: Hot-Plug Capable (bit 6).
pub const SLTCAP_HPC: u32 = 1 << 6;
/// Slot Capabilities: Electromechanical Interlock Present (bit 17).
pub const SLTCAP_EIP: u32 = 1 << 17;
/// Slot Capabilities: No Command Completed Support (bit 18).
pub const SLTCAP_NCCS: u32 = 1 << 18;
/// Slot Capabilities: Physical Slot Number field shift (bits 31:19).
pub const SLTCAP_PSN_SHIFT: u32 = 19;
/// Largest Physical Slot Number (13 bits).
pub const SLTCAP_PSN_MAX: u16 = 0x1fff;

// ---- Slot Control (§7.5.3.10) ----

/// Slot Control: Attention Button Pressed Enable (bit 0).
pub const SLTCTL_ABPE: u16 = 1 << 0;
/// Slot Control: Power Fault Detected Enable (bit 1).
pub const SLTCTL_PFDE: u16 = 1 << 1;
/// Slot Control: MRL Sensor Changed Enable (bit 2).
pub const SLTCTL_MRLSCE: u16 = 1 << 2;
/// Slot Control: Presence Detect Changed Enable (bit 3).
pub const SLTCTL_PDCE: u16 = 1 << 3;
/// Slot Control: Command Completed Interrupt Enable (bit 4).
pub const SLTCTL_CCIE: u16 = 1 << 4;
/// Slot Control: Hot-Plug Interrupt Enable (bit 5).
pub const SLTCTL_HPIE: u16 = 1 << 5;
/// Slot Control: Attention Indicator Control field (bits 7:6).
pub const SLTCTL_AIC: u16 = 0b11 << 6;
/// Shift of [`SLTCTL_AIC`].
pub const SLTCTL_AIC_SHIFT: u16 = 6;
/// Slot Control: Power Indicator Control field (bits 9:8).
pub const SLTCTL_PIC: u16 = 0b11 << 8;
/// Shift of [`SLTCTL_PIC`].
pub const SLTCTL_PIC_SHIFT: u16 = 8;
/// Slot Control: Power Controller Control (bit 10): **0 = power on, 1 = power off**.
pub const SLTCTL_PCC: u16 = 1 << 10;
/// Slot Control: Electromechanical Interlock Control (bit 11).
pub const SLTCTL_EIC: u16 = 1 << 11;
/// Slot Control: Data Link Layer State Changed Enable (bit 12).
pub const SLTCTL_DLLSCE: u16 = 1 << 12;
/// Slot Control: Auto Slot Power Limit Disable (bit 13).
pub const SLTCTL_ASPLD: u16 = 1 << 13;
/// Slot Control: In-Band PD Disable (bit 14).
pub const SLTCTL_IBPDD: u16 = 1 << 14;

// ---- Slot Status (§7.5.3.11) ----

/// Slot Status: Attention Button Pressed (bit 0, RW1C).
pub const SLTSTA_ABP: u16 = 1 << 0;
/// Slot Status: Power Fault Detected (bit 1, RW1C).
pub const SLTSTA_PFD: u16 = 1 << 1;
/// Slot Status: MRL Sensor Changed (bit 2, RW1C).
pub const SLTSTA_MRLSC: u16 = 1 << 2;
/// Slot Status: Presence Detect Changed (bit 3, RW1C).
pub const SLTSTA_PDC: u16 = 1 << 3;
/// Slot Status: Command Completed (bit 4, RW1C).
pub const SLTSTA_CC: u16 = 1 << 4;
/// Slot Status: MRL Sensor State (bit 5, RO; no MRL sensor here, so 0 = closed).
pub const SLTSTA_MRLSS: u16 = 1 << 5;
/// Slot Status: Presence Detect State (bit 6, RO).
pub const SLTSTA_PDS: u16 = 1 << 6;
/// Slot Status: Electromechanical Interlock Status (bit 7, RO; no interlock here).
pub const SLTSTA_EIS: u16 = 1 << 7;
/// Slot Status: Data Link Layer State Changed (bit 8, RW1C).
pub const SLTSTA_DLLSC: u16 = 1 << 8;
/// The write-1-to-clear event bits of Slot Status.
pub const SLTSTA_EVENTS: u16 =
    SLTSTA_ABP | SLTSTA_PFD | SLTSTA_MRLSC | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC;

/// Link Status: Data Link Layer Link Active (bit 13). PCI Express Base Spec 5.0 §7.5.3.8.
pub const LNKSTA_DLLLA: u16 = 1 << 13;

/// Each Slot Status event bit with the Slot Control bit that enables its notification.
const EVENT_ENABLES: [(u16, u16); 6] = [
    (SLTSTA_ABP, SLTCTL_ABPE),
    (SLTSTA_PFD, SLTCTL_PFDE),
    (SLTSTA_MRLSC, SLTCTL_MRLSCE),
    (SLTSTA_PDC, SLTCTL_PDCE),
    (SLTSTA_CC, SLTCTL_CCIE),
    (SLTSTA_DLLSC, SLTCTL_DLLSCE),
];

/// The notification enable bits of Slot Control (without Hot-Plug Interrupt Enable).
pub const SLTCTL_EVENT_ENABLES: u16 =
    SLTCTL_ABPE | SLTCTL_PFDE | SLTCTL_MRLSCE | SLTCTL_PDCE | SLTCTL_CCIE | SLTCTL_DLLSCE;

/// What the slot has, as advertised in Slot Capabilities. The slot never has an MRL sensor or an
/// electromechanical interlock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotCapabilities {
    /// Attention Button Present: the VMM can ask the guest to remove the card.
    pub attention_button: bool,
    /// Power Controller Present: the guest switches slot power through Slot Control.
    pub power_controller: bool,
    /// Attention Indicator Present.
    pub attention_indicator: bool,
    /// Power Indicator Present.
    pub power_indicator: bool,
    /// Hot-Plug Surprise: the card may be removed without prior notification.
    pub hot_plug_surprise: bool,
    /// Hot-Plug Capable. Clear for a slot whose hot-plug is not handled natively (e.g. ACPI
    /// hot-plug): Linux's pciehp then does not bind to the port.
    pub hot_plug_capable: bool,
    /// No Command Completed Support: Command Completed is never set.
    pub no_command_completed: bool,
    /// Physical Slot Number (13 bits; larger values are truncated).
    pub physical_slot_number: u16,
}

impl SlotCapabilities {
    /// A native hot-plug slot like QEMU's `pcie-root-port`: attention button, power controller,
    /// both indicators, surprise removal, hot-plug capable, Command Completed supported.
    pub fn native(physical_slot_number: u16) -> Self {
        SlotCapabilities {
            attention_button: true,
            power_controller: true,
            attention_indicator: true,
            power_indicator: true,
            hot_plug_surprise: true,
            hot_plug_capable: true,
            no_command_completed: false,
            physical_slot_number,
        }
    }

    /// A slot without native hot-plug (for ACPI hot-plug): Hot-Plug Capable clear, no button,
    /// indicators or power controller, No Command Completed Support; only the Physical Slot
    /// Number. Presence and link are still reported.
    pub fn without_native_hotplug(physical_slot_number: u16) -> Self {
        SlotCapabilities {
            attention_button: false,
            power_controller: false,
            attention_indicator: false,
            power_indicator: false,
            hot_plug_surprise: false,
            hot_plug_capable: false,
            no_command_completed: true,
            physical_slot_number,
        }
    }

    /// The Slot Capabilities register (Slot Power Limit 0).
    pub fn register(&self) -> u32 {
        let flag = |set: bool, bit: u32| if set { bit } else { 0 };
        flag(self.attention_button, SLTCAP_ABP)
            | flag(self.power_controller, SLTCAP_PCP)
            | flag(self.attention_indicator, SLTCAP_AIP)
            | flag(self.power_indicator, SLTCAP_PIP)
            | flag(self.hot_plug_surprise, SLTCAP_HPS)
            | flag(self.hot_plug_capable, SLTCAP_HPC)
            | flag(self.no_command_completed, SLTCAP_NCCS)
            | (u32::from(self.physical_slot_number & SLTCAP_PSN_MAX) << SLTCAP_PSN_SHIFT)
    }

    /// The Slot Control bits a guest may change on this slot; the rest are hardwired (to 0, or
    /// to the value they had, for an indicator that is not present).
    pub fn writable_control(&self) -> u16 {
        let flag = |set: bool, bits: u16| if set { bits } else { 0 };
        SLTCTL_HPIE
            | SLTCTL_PDCE
            | SLTCTL_DLLSCE
            | flag(self.attention_button, SLTCTL_ABPE)
            | flag(self.power_controller, SLTCTL_PFDE | SLTCTL_PCC)
            | flag(!self.no_command_completed, SLTCTL_CCIE)
            | flag(self.attention_indicator, SLTCTL_AIC)
            | flag(self.power_indicator, SLTCTL_PIC)
    }
}

/// The state of an attention or power indicator (Slot Control bits 7:6 and 9:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Indicator {
    /// `00b`: reserved (also the value of an indicator that is not present).
    Reserved,
    /// `01b`: on.
    On,
    /// `10b`: blinking.
    Blinking,
    /// `11b`: off.
    Off,
}

impl Indicator {
    /// The indicator from its 2-bit field value (higher bits ignored).
    pub fn from_bits(bits: u16) -> Self {
        match bits & 0b11 {
            0b01 => Indicator::On,
            0b10 => Indicator::Blinking,
            0b11 => Indicator::Off,
            _ => Indicator::Reserved,
        }
    }

    /// The 2-bit field value.
    pub fn bits(self) -> u16 {
        match self {
            Indicator::Reserved => 0b00,
            Indicator::On => 0b01,
            Indicator::Blinking => 0b10,
            Indicator::Off => 0b11,
        }
    }
}

impl fmt::Display for Indicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Indicator::Reserved => "reserved",
            Indicator::On => "on",
            Indicator::Blinking => "blinking",
            Indicator::Off => "off",
        })
    }
}

/// Which notifications the guest enabled in Slot Control: whether its hot-plug driver has armed
/// the slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotNotifications {
    /// Hot-Plug Interrupt Enable: without it nothing interrupts.
    pub hot_plug_interrupt: bool,
    /// Attention Button Pressed Enable.
    pub attention_button: bool,
    /// Power Fault Detected Enable.
    pub power_fault: bool,
    /// MRL Sensor Changed Enable.
    pub mrl_sensor: bool,
    /// Presence Detect Changed Enable.
    pub presence_detect: bool,
    /// Command Completed Interrupt Enable.
    pub command_completed: bool,
    /// Data Link Layer State Changed Enable.
    pub link_state: bool,
}

impl SlotNotifications {
    /// The notification bits of a Slot Control value.
    pub fn from_control(control: u16) -> Self {
        SlotNotifications {
            hot_plug_interrupt: control & SLTCTL_HPIE != 0,
            attention_button: control & SLTCTL_ABPE != 0,
            power_fault: control & SLTCTL_PFDE != 0,
            mrl_sensor: control & SLTCTL_MRLSCE != 0,
            presence_detect: control & SLTCTL_PDCE != 0,
            command_completed: control & SLTCTL_CCIE != 0,
            link_state: control & SLTCTL_DLLSCE != 0,
        }
    }

    /// Whether a hot-add or removal would interrupt the guest: Hot-Plug Interrupt Enable and at
    /// least one of Presence Detect Changed or Data Link Layer State Changed enabled (Linux's
    /// pciehp enables Data Link Layer State Changed always, plus Attention Button Pressed or
    /// Presence Detect Changed).
    pub fn armed(&self) -> bool {
        self.hot_plug_interrupt && (self.presence_detect || self.link_state)
    }
}

/// What a guest command (a write to Slot Control) did, for the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotEvent {
    /// Power Controller Control went from off (1) to on (0): the guest powers the slot.
    PowerOn,
    /// Power Controller Control went from on (0) to off (1): the guest has let go of the card;
    /// the VMM may now release the device and call [`HotplugSlot::remove_card`].
    PowerOff,
    /// The power indicator changed to this state.
    PowerIndicator(Indicator),
    /// The attention indicator changed to this state.
    AttentionIndicator(Indicator),
    /// The notification enables (or Hot-Plug Interrupt Enable) changed to these.
    Notifications(SlotNotifications),
    /// The power command took the link up (`true`) or down (`false`); Data Link Layer State
    /// Changed was set.
    LinkActive(bool),
}

/// Errors of the VMM's slot operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// A card is already present.
    #[error("the slot already holds a card")]
    Occupied,
    /// No card is present.
    #[error("the slot is empty")]
    Empty,
}

/// The state machine of one hot-plug slot. See the module documentation.
#[derive(Clone, Debug)]
pub struct HotplugSlot {
    caps: SlotCapabilities,
    /// Slot Control as the guest sees it.
    control: u16,
    /// The set Slot Status event bits ([`SLTSTA_EVENTS`]).
    events: u16,
    present: bool,
    link_active: bool,
    /// Whether the pending set was non-empty after the last change (§6.7.3.4).
    asserted: bool,
    /// An MSI became due and was not yet taken.
    interrupt_due: bool,
}

impl HotplugSlot {
    /// An empty slot: power off (if there is a power controller), power indicator off,
    /// attention indicator off, no notifications enabled, no events.
    pub fn new(caps: SlotCapabilities) -> Self {
        let mut slot = HotplugSlot {
            caps,
            control: 0,
            events: 0,
            present: false,
            link_active: false,
            asserted: false,
            interrupt_due: false,
        };
        slot.control = slot.reset_control();
        slot
    }

    /// Slot Control after reset for the current presence: indicators off (or on for the power
    /// indicator of an occupied slot), power on only for an occupied slot.
    fn reset_control(&self) -> u16 {
        let mut control = 0;
        if self.caps.attention_indicator {
            control |= Indicator::Off.bits() << SLTCTL_AIC_SHIFT;
        }
        if self.caps.power_indicator {
            let pic = if self.present {
                Indicator::On
            } else {
                Indicator::Off
            };
            control |= pic.bits() << SLTCTL_PIC_SHIFT;
        }
        if self.caps.power_controller && !self.present {
            control |= SLTCTL_PCC;
        }
        control
    }

    /// The capabilities the slot was built with.
    pub fn capabilities(&self) -> SlotCapabilities {
        self.caps
    }

    /// The Slot Capabilities register.
    pub fn slot_capabilities(&self) -> u32 {
        self.caps.register()
    }

    /// The Slot Control register.
    pub fn slot_control(&self) -> u16 {
        self.control
    }

    /// The Slot Status register: event bits, Presence Detect State; MRL Sensor State and
    /// Electromechanical Interlock Status read 0.
    pub fn slot_status(&self) -> u16 {
        self.events | if self.present { SLTSTA_PDS } else { 0 }
    }

    /// The Data Link Layer Link Active bit of Link Status ([`LNKSTA_DLLLA`] or 0).
    pub fn link_status_bits(&self) -> u16 {
        if self.link_active {
            LNKSTA_DLLLA
        } else {
            0
        }
    }

    /// Whether a card is present (Presence Detect State).
    pub fn is_present(&self) -> bool {
        self.present
    }

    /// Whether the link is up (Data Link Layer Link Active).
    pub fn is_link_active(&self) -> bool {
        self.link_active
    }

    /// Whether slot power is on: Power Controller Control is 0 (always, without a power
    /// controller).
    pub fn is_powered(&self) -> bool {
        self.control & SLTCTL_PCC == 0
    }

    /// The power indicator.
    pub fn power_indicator(&self) -> Indicator {
        Indicator::from_bits(self.control >> SLTCTL_PIC_SHIFT)
    }

    /// The attention indicator.
    pub fn attention_indicator(&self) -> Indicator {
        Indicator::from_bits(self.control >> SLTCTL_AIC_SHIFT)
    }

    /// Which notifications the guest enabled.
    pub fn notifications(&self) -> SlotNotifications {
        SlotNotifications::from_control(self.control)
    }

    /// Whether the guest armed the slot ([`SlotNotifications::armed`]).
    pub fn is_armed(&self) -> bool {
        self.notifications().armed()
    }

    /// The Slot Status event bits that are set, enabled or not (what the guest has not yet
    /// cleared).
    pub fn status_events(&self) -> u16 {
        self.events
    }

    /// The events that are pending in the §6.7.3.4 sense: set, enabled, and Hot-Plug Interrupt
    /// Enable set. Non-empty means the hot-plug interrupt is asserted.
    pub fn pending_events(&self) -> u16 {
        if self.control & SLTCTL_HPIE == 0 {
            return 0;
        }
        EVENT_ENABLES
            .iter()
            .filter(|(status, enable)| self.events & status != 0 && self.control & enable != 0)
            .fold(0, |acc, (status, _)| acc | status)
    }

    /// Whether the hot-plug interrupt is asserted (some event pending).
    pub fn interrupt_asserted(&self) -> bool {
        self.asserted
    }

    /// Whether an MSI became due since the last call; clears the flag. Call after every
    /// operation and send the port's MSI when it returns true.
    pub fn take_interrupt(&mut self) -> bool {
        std::mem::take(&mut self.interrupt_due)
    }

    /// Re-evaluates the pending set after a change (§6.7.3.4).
    fn update_interrupt(&mut self) {
        let asserted = self.pending_events() != 0;
        if asserted && !self.asserted {
            self.interrupt_due = true;
        }
        self.asserted = asserted;
    }

    fn set_events(&mut self, events: u16) {
        self.events |= events & SLTSTA_EVENTS;
        self.update_interrupt();
    }

    // ---- The VMM's operations ----

    /// A card present before the guest runs (cold plug): presence, link up, power on, power
    /// indicator on; no change bits, no interrupt.
    pub fn cold_plug(&mut self) -> Result<(), SlotError> {
        if self.present {
            return Err(SlotError::Occupied);
        }
        self.present = true;
        self.link_active = true;
        self.control &= !SLTCTL_PCC;
        if self.caps.power_indicator {
            self.control =
                (self.control & !SLTCTL_PIC) | (Indicator::On.bits() << SLTCTL_PIC_SHIFT);
        }
        self.update_interrupt();
        Ok(())
    }

    /// Hot-add: Presence Detect State 1, Data Link Layer Link Active 1, Presence Detect Changed
    /// and Data Link Layer State Changed set (the link comes up at once, whatever the power
    /// controller says: see the module documentation). At most one MSI.
    pub fn insert(&mut self) -> Result<(), SlotError> {
        if self.present {
            return Err(SlotError::Occupied);
        }
        self.present = true;
        if !self.is_armed() && self.caps.power_controller && self.control & SLTCTL_PCC != 0 {
            // No hot-plug driver drives the slot (yet): the card comes up powered, as firmware
            // powers an occupied slot at boot. See the module documentation.
            self.control &= !SLTCTL_PCC;
            if self.caps.power_indicator {
                self.control =
                    (self.control & !SLTCTL_PIC) | (Indicator::On.bits() << SLTCTL_PIC_SHIFT);
            }
        }
        let mut events = SLTSTA_PDC;
        if !self.link_active {
            self.link_active = true;
            events |= SLTSTA_DLLSC;
        }
        self.set_events(events);
        Ok(())
    }

    /// The attention button is pressed: Attention Button Pressed set. Linux's pciehp answers on
    /// an occupied, powered slot by blinking the power indicator and, 5 s later unless the
    /// button is pressed again, powering the slot off ([`SlotEvent::PowerOff`]). Works on an
    /// empty slot too (the guest may then try to power it on).
    pub fn press_attention_button(&mut self) {
        self.set_events(SLTSTA_ABP);
    }

    /// The card disappears without notice: Presence Detect State 0 and Presence Detect Changed
    /// set; if the link was up, Data Link Layer Link Active 0 and Data Link Layer State Changed
    /// set.
    pub fn surprise_remove(&mut self) -> Result<(), SlotError> {
        if !self.present {
            return Err(SlotError::Empty);
        }
        self.present = false;
        let mut events = SLTSTA_PDC;
        if self.link_active {
            self.link_active = false;
            events |= SLTSTA_DLLSC;
        }
        self.set_events(events);
        Ok(())
    }

    /// The card is taken out after the guest powered the slot off (graceful removal, after
    /// [`SlotEvent::PowerOff`]): Presence Detect State 0 and Presence Detect Changed set. The
    /// link is already down then; if it is not (the guest never powered off), this is a
    /// [`surprise_remove`](Self::surprise_remove).
    pub fn remove_card(&mut self) -> Result<(), SlotError> {
        self.surprise_remove()
    }

    // ---- The guest's accesses ----

    /// A guest write of `value` to Slot Control: one command (§6.7.3.2). Read-only bits keep
    /// their value; power and indicator changes are carried out at once; Command Completed is
    /// set (unless No Command Completed Support). Returns what changed, in this order:
    /// power, link, indicators, notifications.
    pub fn write_control(&mut self, value: u16) -> Vec<SlotEvent> {
        let writable = self.caps.writable_control();
        let old = self.control;
        let new = (old & !writable) | (value & writable);
        self.control = new;

        let mut out = Vec::new();
        let mut events = 0;
        if (old ^ new) & SLTCTL_PCC != 0 {
            if new & SLTCTL_PCC == 0 {
                out.push(SlotEvent::PowerOn);
                if self.present && !self.link_active {
                    self.link_active = true;
                    events |= SLTSTA_DLLSC;
                    out.push(SlotEvent::LinkActive(true));
                }
            } else {
                out.push(SlotEvent::PowerOff);
                if self.link_active {
                    self.link_active = false;
                    events |= SLTSTA_DLLSC;
                    out.push(SlotEvent::LinkActive(false));
                }
            }
        }
        if (old ^ new) & SLTCTL_PIC != 0 {
            out.push(SlotEvent::PowerIndicator(self.power_indicator()));
        }
        if (old ^ new) & SLTCTL_AIC != 0 {
            out.push(SlotEvent::AttentionIndicator(self.attention_indicator()));
        }
        if (old ^ new) & (SLTCTL_EVENT_ENABLES | SLTCTL_HPIE) != 0 {
            out.push(SlotEvent::Notifications(self.notifications()));
        }
        if !self.caps.no_command_completed {
            events |= SLTSTA_CC;
        }
        self.set_events(events);
        // Enabling a notification whose status is already set counts too.
        self.update_interrupt();
        out
    }

    /// A guest write of `value` to Slot Status: every event bit written as 1 is cleared; all
    /// other bits are read-only.
    pub fn write_status(&mut self, value: u16) {
        self.events &= !(value & SLTSTA_EVENTS);
        self.update_interrupt();
    }
}

/// The saved state of a [`HotplugSlot`]: what the guest wrote to Slot Control, the pending
/// Slot Status events and the card's presence and link. The capabilities are not saved: they
/// come from building the same slot again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HotplugSlotState {
    /// Slot Control.
    pub control: u16,
    /// The set Slot Status event bits.
    pub events: u16,
    /// A card is in the slot.
    pub present: bool,
    /// The link to the card is up.
    pub link_active: bool,
    /// The interrupt condition was asserted after the last change (§6.7.3.4).
    pub asserted: bool,
    /// An MSI is due and was not taken yet.
    pub interrupt_due: bool,
}

impl HotplugSlot {
    /// The slot's state now.
    pub fn state(&self) -> HotplugSlotState {
        HotplugSlotState {
            control: self.control,
            events: self.events,
            present: self.present,
            link_active: self.link_active,
            asserted: self.asserted,
            interrupt_due: self.interrupt_due,
        }
    }

    /// Puts `state` back: the guest finds Slot Control, Slot Status and the card as they were.
    /// Event bits the slot cannot raise are dropped.
    pub fn restore(&mut self, state: &HotplugSlotState) {
        self.control = state.control;
        self.events = state.events & SLTSTA_EVENTS;
        self.present = state.present;
        self.link_active = state.link_active;
        self.asserted = state.asserted;
        self.interrupt_due = state.interrupt_due;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed_slot() -> HotplugSlot {
        let mut s = HotplugSlot::new(SlotCapabilities::native(3));
        // What pciehp's pcie_enable_notification writes on a slot with an attention button.
        let _ = s.write_control(
            s.slot_control() | SLTCTL_DLLSCE | SLTCTL_ABPE | SLTCTL_HPIE | SLTCTL_CCIE,
        );
        assert!(s.take_interrupt(), "CC of the enabling command");
        s.write_status(SLTSTA_CC);
        assert!(!s.interrupt_asserted());
        s
    }

    #[test]
    fn insert_into_an_unarmed_slot_powers_it_and_the_guest_can_power_it_off_later() {
        let mut s = HotplugSlot::new(SlotCapabilities::native(3));
        s.insert().unwrap();
        assert!(s.is_powered() && s.is_link_active());
        assert_eq!(s.power_indicator(), Indicator::On);
        // An armed slot is left to the guest: power stays off until it asks.
        let mut armed = armed_slot();
        armed.insert().unwrap();
        assert!(!armed.is_powered() && armed.is_link_active());
        assert_eq!(armed.power_indicator(), Indicator::Off);
        // pciehp binds later, takes the slot as enabled, and on removal powers it off: that is
        // a transition the VMM hears of.
        let _ = s.write_control(s.slot_control() | SLTCTL_HPIE | SLTCTL_ABPE | SLTCTL_DLLSCE);
        s.press_attention_button();
        let events = s.write_control(s.slot_control() | SLTCTL_PCC);
        assert!(events.contains(&SlotEvent::PowerOff), "{events:?}");
    }

    #[test]
    fn capabilities_register() {
        let caps = SlotCapabilities::native(5);
        assert_eq!(caps.register(), 0x7b | (5 << 19));
        let mut nccs = caps;
        nccs.no_command_completed = true;
        assert_eq!(nccs.register() & SLTCAP_NCCS, SLTCAP_NCCS);
        assert_eq!(nccs.writable_control() & SLTCTL_CCIE, 0);
        let acpi = SlotCapabilities::without_native_hotplug(0x3fff);
        assert_eq!(acpi.register(), SLTCAP_NCCS | (0x1fff << 19));
        assert_eq!(
            SlotCapabilities::native(0).writable_control(),
            0x17ff & !SLTCTL_MRLSCE & !SLTCTL_EIC
        );
    }

    #[test]
    fn reset_state() {
        let s = HotplugSlot::new(SlotCapabilities::native(1));
        assert_eq!(s.slot_control(), 0x07c0); // PCC off, PIC off, AIC off
        assert_eq!(s.slot_status(), 0);
        assert_eq!(s.link_status_bits(), 0);
        assert!(!s.is_powered());
        assert_eq!(s.power_indicator(), Indicator::Off);
        assert_eq!(s.attention_indicator(), Indicator::Off);
        assert!(!s.is_armed());
        let acpi = HotplugSlot::new(SlotCapabilities::without_native_hotplug(1));
        assert_eq!(acpi.slot_control(), 0);
        assert!(acpi.is_powered());
    }

    #[test]
    fn cold_plug_is_silent() {
        let mut s = HotplugSlot::new(SlotCapabilities::native(1));
        s.cold_plug().unwrap();
        assert_eq!(s.slot_status(), SLTSTA_PDS);
        assert_eq!(s.link_status_bits(), LNKSTA_DLLLA);
        assert!(s.is_powered());
        assert_eq!(s.power_indicator(), Indicator::On);
        assert!(!s.take_interrupt());
        assert_eq!(s.cold_plug(), Err(SlotError::Occupied));
    }

    #[test]
    fn w1c_semantics() {
        let mut s = HotplugSlot::new(SlotCapabilities::native(1));
        s.insert().unwrap();
        s.press_attention_button();
        let _ = s.write_control(s.slot_control());
        assert_eq!(
            s.slot_status(),
            SLTSTA_ABP | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC | SLTSTA_PDS
        );
        // Writing 0s clears nothing; read-only bits ignore 1s.
        s.write_status(0);
        s.write_status(SLTSTA_PDS | SLTSTA_MRLSS | SLTSTA_EIS | 0xfe00);
        assert_eq!(
            s.slot_status() & SLTSTA_EVENTS,
            SLTSTA_ABP | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC
        );
        assert!(s.is_present());
        s.write_status(SLTSTA_PDC);
        assert_eq!(
            s.slot_status(),
            SLTSTA_ABP | SLTSTA_CC | SLTSTA_DLLSC | SLTSTA_PDS
        );
        s.write_status(0xffff);
        assert_eq!(s.slot_status(), SLTSTA_PDS);
    }

    #[test]
    fn control_read_only_bits() {
        let mut s = HotplugSlot::new(SlotCapabilities::native(1));
        let _ = s.write_control(0xffff);
        // MRLSCE, EIC, ASPLD, IBPDD and bit 15 stay 0.
        assert_eq!(s.slot_control(), 0x17ff & !SLTCTL_MRLSCE & !SLTCTL_EIC);
        let mut acpi = HotplugSlot::new(SlotCapabilities::without_native_hotplug(1));
        let _ = acpi.write_control(0xffff);
        assert_eq!(
            acpi.slot_control(),
            SLTCTL_HPIE | SLTCTL_PDCE | SLTCTL_DLLSCE
        );
        // No Command Completed Support: CC is never set.
        assert_eq!(acpi.slot_status() & SLTSTA_CC, 0);
    }

    #[test]
    fn interrupt_only_on_transition_from_empty() {
        let mut s = armed_slot();
        s.insert().unwrap();
        assert_eq!(s.pending_events(), SLTSTA_DLLSC); // PDC is not enabled (ABPE instead)
        assert!(s.take_interrupt());
        assert!(!s.take_interrupt());
        // Another event while one is pending: no new MSI.
        s.press_attention_button();
        assert!(!s.take_interrupt());
        // Clearing only part keeps it asserted.
        s.write_status(SLTSTA_DLLSC);
        assert!(s.interrupt_asserted());
        s.write_status(SLTSTA_ABP | SLTSTA_PDC);
        assert!(!s.interrupt_asserted());
        s.press_attention_button();
        assert!(s.take_interrupt());
    }

    #[test]
    fn no_interrupt_without_hpie_or_enable() {
        let mut s = HotplugSlot::new(SlotCapabilities::native(1));
        s.insert().unwrap();
        assert!(!s.take_interrupt());
        // Enabling DLLSCE alone: still no HPIE.
        let _ = s.write_control(s.slot_control() | SLTCTL_DLLSCE);
        assert!(!s.take_interrupt());
        // Setting HPIE with DLLSC set: the pending set becomes non-empty.
        let _ = s.write_control(s.slot_control() | SLTCTL_HPIE);
        assert!(s.take_interrupt());
    }

    #[test]
    fn enabling_notifications_with_status_set_interrupts() {
        let mut s = HotplugSlot::new(SlotCapabilities::native(1));
        s.insert().unwrap();
        let _ = s.write_control(s.slot_control() | SLTCTL_HPIE | SLTCTL_PDCE);
        assert!(s.take_interrupt());
    }

    #[test]
    fn power_commands_and_link() {
        let mut s = armed_slot();
        s.insert().unwrap();
        s.write_status(SLTSTA_EVENTS);
        assert!(s.take_interrupt());
        assert_eq!(
            s.write_control(s.slot_control() & !SLTCTL_PCC),
            vec![SlotEvent::PowerOn]
        );
        assert!(s.is_link_active());
        s.write_status(SLTSTA_EVENTS);
        assert!(s.take_interrupt()); // CC
        assert_eq!(
            s.write_control(s.slot_control() | SLTCTL_PCC),
            vec![SlotEvent::PowerOff, SlotEvent::LinkActive(false)]
        );
        assert!(s.is_present());
        assert_eq!(s.slot_status() & SLTSTA_DLLSC, SLTSTA_DLLSC);
        s.write_status(SLTSTA_EVENTS);
        assert_eq!(
            s.write_control(s.slot_control() & !SLTCTL_PCC),
            vec![SlotEvent::PowerOn, SlotEvent::LinkActive(true)]
        );
        // A command that changes nothing still completes.
        s.write_status(SLTSTA_EVENTS);
        assert!(s.write_control(s.slot_control()).is_empty());
        assert_eq!(s.slot_status() & SLTSTA_CC, SLTSTA_CC);
    }

    #[test]
    fn removal_errors() {
        let mut s = HotplugSlot::new(SlotCapabilities::native(1));
        assert_eq!(s.surprise_remove(), Err(SlotError::Empty));
        assert_eq!(s.remove_card(), Err(SlotError::Empty));
        s.insert().unwrap();
        assert_eq!(s.insert(), Err(SlotError::Occupied));
        s.surprise_remove().unwrap();
        assert_eq!(s.slot_status(), SLTSTA_PDC | SLTSTA_DLLSC);
        assert!(!s.is_link_active());
    }

    #[test]
    fn indicators() {
        for bits in 0..4 {
            assert_eq!(Indicator::from_bits(bits).bits(), bits);
        }
        assert_eq!(Indicator::Blinking.to_string(), "blinking");
        let mut s = HotplugSlot::new(SlotCapabilities::native(1));
        let ctl =
            (s.slot_control() & !SLTCTL_PIC) | (Indicator::Blinking.bits() << SLTCTL_PIC_SHIFT);
        assert_eq!(
            s.write_control(ctl),
            vec![SlotEvent::PowerIndicator(Indicator::Blinking)]
        );
        let ctl = (s.slot_control() & !SLTCTL_AIC) | (Indicator::On.bits() << SLTCTL_AIC_SHIFT);
        assert_eq!(
            s.write_control(ctl),
            vec![SlotEvent::AttentionIndicator(Indicator::On)]
        );
    }
}
