//! The 16550 UART on the guest's port I/O bus: vm-superio's model wired to an [`InterruptLine`]
//! and to a host writer, with input flow control.
//!
//! The 16550's receive FIFO is small (64 bytes), so host input that does not fit is kept by the
//! caller and offered again when the guest drains the FIFO: [`SerialDevice::with_drain_notifier`]
//! tells the caller when that happens.

use std::io::{self, Write};
use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::interrupt::InterruptLine;
use crate::state::StateError;

/// Number of I/O ports a 16550 decodes (THR/RBR .. SCR).
pub const SERIAL_PORT_SIZE: u16 = 8;

/// Adapts an [`InterruptLine`] to vm-superio's [`Trigger`].
pub struct LineTrigger(pub Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Called when the guest has read every byte of the receive FIFO.
pub trait DrainNotifier: Send {
    /// The receive FIFO is empty again.
    fn drained(&self);
}

/// Forwards vm-superio's "input buffer empty" event to a [`DrainNotifier`].
pub struct DrainEvents(Option<Box<dyn DrainNotifier>>);

impl SerialEvents for DrainEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(n) = &self.0 {
            n.drained();
        }
    }
}

/// A 16550 UART (the guest's console) registered on the port I/O bus at its base port.
pub struct SerialDevice {
    uart: Serial<LineTrigger, DrainEvents, Box<dyn Write + Send>>,
    irq: Arc<dyn InterruptLine>,
}

/// Interrupt Enable Register offset and its "THR empty" bit (16550 data sheet, IER bit 1).
const IER_OFFSET: u8 = 1;
const IER_THRI: u8 = 0x02;
/// IER's "received data available" bit (16550 data sheet, IER bit 0).
const IER_RDI: u8 = 0x01;
/// Line Status Register offset and its "data ready" bit (16550 data sheet, LSR bit 0).
const LSR_OFFSET: u8 = 5;
const LSR_DR: u8 = 0x01;
/// Line Control Register offset and its divisor latch access bit.
const LCR_OFFSET: u8 = 3;
const LCR_DLAB: u8 = 0x80;

impl SerialDevice {
    /// A UART that raises `irq` and writes what the guest transmits to `out`.
    pub fn new(irq: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        Self::with_drain_notifier(irq, out, None)
    }

    /// Like [`SerialDevice::new`], and `notifier` hears when the guest has emptied the receive FIFO.
    pub fn with_drain_notifier(
        irq: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
        notifier: Option<Box<dyn DrainNotifier>>,
    ) -> Self {
        SerialDevice {
            uart: Serial::with_events(LineTrigger(irq.clone()), DrainEvents(notifier), out),
            irq,
        }
    }

    /// Like [`SerialDevice::with_drain_notifier`], with the registers and the receive FIFO as
    /// `state` saved them: the guest finds the UART as it left it, input it had not read yet
    /// included.
    pub fn restored(
        irq: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
        notifier: Option<Box<dyn DrainNotifier>>,
        state: &SerialDeviceState,
    ) -> Result<Self, StateError> {
        let uart = Serial::from_state(
            &state.to_superio(),
            LineTrigger(irq.clone()),
            DrainEvents(notifier),
            out,
        )
        .map_err(|e| StateError::new("serial", format!("{e:?}")))?;
        Ok(SerialDevice { uart, irq })
    }

    /// The registers and the receive FIFO now.
    pub fn state(&self) -> SerialDeviceState {
        SerialDeviceState::from_superio(&self.uart.state())
    }

    /// Queues host input for the guest; returns how many bytes fitted into the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        let room = self.uart.fifo_capacity();
        let n = room.min(input.len());
        if n == 0 {
            return Ok(0);
        }
        let n = self
            .uart
            .enqueue_raw_bytes(&input[..n])
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))?;
        // Received data with the receive interrupt enabled must interrupt, as a 16550's level
        // output would. vm-superio skips the edge while it has a received-data interrupt on
        // record that the guest has not acknowledged by reading IIR — and if that record's
        // edge never reached the guest, input then sits in the FIFO for good. (Seen with 2
        // vCPUs, intermittently: a command sent, no echo, both vCPUs idle.)
        self.spare_edge(IER_RDI);
        Ok(n)
    }

    /// Raises the interrupt once more if any of `ier_bits` is enabled, whatever interrupt
    /// vm-superio has on record: the edge a 16550's level output would give an edge-triggered
    /// IOAPIC pin. A spare edge costs one spurious, harmless interrupt.
    fn spare_edge(&mut self, ier_bits: u8) {
        // With DLAB set, offset 1 is the divisor latch, not IER.
        if self.uart.read(LCR_OFFSET) & LCR_DLAB == 0 && self.uart.read(IER_OFFSET) & ier_bits != 0
        {
            if let Err(e) = self.irq.trigger() {
                log::warn!("serial interrupt: {e}");
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

/// The saved state of a [`SerialDevice`]: the 16550's registers and its receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low and high byte.
    pub divisor: [u8; 2],
    /// Interrupt Enable Register.
    pub interrupt_enable: u8,
    /// Interrupt Identification Register.
    pub interrupt_identification: u8,
    /// Line Control Register.
    pub line_control: u8,
    /// Line Status Register.
    pub line_status: u8,
    /// Modem Control Register.
    pub modem_control: u8,
    /// Modem Status Register.
    pub modem_status: u8,
    /// Scratch Register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    #[serde(with = "hex")]
    pub input: Vec<u8>,
}

impl SerialDeviceState {
    fn from_superio(s: &SerialState) -> Self {
        SerialDeviceState {
            divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            input: s.in_buffer.clone(),
        }
    }

    fn to_superio(&self) -> SerialState {
        SerialState {
            baud_divisor_low: self.divisor[0],
            baud_divisor_high: self.divisor[1],
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.input.clone(),
        }
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        // A 16550 has byte-wide registers; wider reads see the register in the low byte.
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            if off < SERIAL_PORT_SIZE as u8 {
                *first = self.uart.read(off);
            }
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if off < SERIAL_PORT_SIZE as u8 {
                if let Err(e) = self.uart.write(off, value) {
                    crate::guest_log::report(
                        "serial write failed",
                        log::Level::Warn,
                        format_args!("serial write at offset {off}: {e:?}"),
                    );
                }
                // Enabling the THR-empty interrupt while the (always empty) transmitter holds
                // nothing must interrupt. vm-superio skips the edge when it still has a THR-empty
                // interrupt on record from before — one the guest may already have consumed by
                // then — and the guest's transmitter then waits forever (seen with 2 vCPUs: both
                // idle, tty output stuck). The same for (re-)enabling the receive interrupt with
                // data in the FIFO (Linux's console write and tty unthrottle restore IER so).
                if off == IER_OFFSET {
                    let input_waiting = self.uart.read(LSR_OFFSET) & LSR_DR != 0;
                    self.spare_edge(IER_THRI | if input_waiting { IER_RDI } else { 0 });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingInterrupt;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const BASE: PioAddress = PioAddress(0x3f8);

    #[test]
    fn transmits_to_writer_and_receives_input() {
        let irq = Arc::new(CountingInterrupt::default());
        let sink = Sink::default();
        let mut s = SerialDevice::new(irq.clone(), Box::new(sink.clone()));
        s.pio_write(BASE, 0, b"h");
        s.pio_write(BASE, 0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");

        // Enable the received-data interrupt (IER bit 0), then queue input.
        s.pio_write(BASE, 1, &[1]);
        assert_eq!(s.enqueue_input(b"ok").unwrap(), 2);
        assert!(irq.count() >= 1);
        let mut b = [0u8; 1];
        s.pio_read(BASE, 0, &mut b);
        assert_eq!(b[0], b'o');
        s.pio_read(BASE, 0, &mut b);
        assert_eq!(b[0], b'k');
    }

    #[test]
    fn enabling_thr_empty_interrupt_always_interrupts() {
        let irq = Arc::new(CountingInterrupt::default());
        let mut s = SerialDevice::new(irq.clone(), Box::new(io::sink()));
        // Linux's 8250 driver: start TX (IER |= THRI), stop it, start it again, without reading
        // IIR in between (another vCPU consumed the interrupt). Each start must interrupt, or
        // the guest's transmitter waits forever on an edge-triggered IOAPIC pin.
        s.pio_write(BASE, 1, &[0x07]);
        s.pio_write(BASE, 1, &[0x05]);
        s.pio_write(BASE, 1, &[0x07]);
        assert!(irq.count() >= 2, "only {} interrupts", irq.count());
        // With DLAB set, offset 1 is the divisor latch: no interrupt.
        let before = irq.count();
        s.pio_write(BASE, 3, &[0x80]);
        s.pio_write(BASE, 1, &[0x07]);
        assert_eq!(irq.count(), before);
    }

    #[test]
    fn input_always_interrupts_while_the_receive_interrupt_is_enabled() {
        let irq = Arc::new(CountingInterrupt::default());
        let mut s = SerialDevice::new(irq.clone(), Box::new(io::sink()));
        // No receive interrupt enabled: input waits silently.
        s.enqueue_input(b"a").unwrap();
        assert_eq!(irq.count(), 0);
        s.pio_write(BASE, 1, &[0x01]);
        let before = irq.count();
        // The guest has not read IIR since the first interrupt (its edge may never have
        // arrived): more input interrupts again all the same.
        s.enqueue_input(b"b").unwrap();
        s.enqueue_input(b"c").unwrap();
        assert!(irq.count() >= before + 2, "{} -> {}", before, irq.count());
        // Masking and unmasking the receive interrupt with data waiting interrupts too.
        s.pio_write(BASE, 1, &[0x00]);
        let before = irq.count();
        s.pio_write(BASE, 1, &[0x01]);
        assert!(irq.count() > before);
        let mut b = [0u8; 1];
        for want in b"abc" {
            s.pio_read(BASE, 0, &mut b);
            assert_eq!(b[0], *want);
        }
    }

    #[test]
    fn input_beyond_fifo_is_left_to_caller() {
        let irq = Arc::new(CountingInterrupt::default());
        let mut s = SerialDevice::new(irq, Box::new(io::sink()));
        let big = vec![b'x'; 1000];
        let n = s.enqueue_input(&big).unwrap();
        assert!(n < big.len());
        assert_eq!(s.input_room(), 0);
        assert_eq!(s.enqueue_input(&big).unwrap(), 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let irq = Arc::new(CountingInterrupt::default());
        let mut s = SerialDevice::new(irq, Box::new(io::sink()));
        for off in 0..16u16 {
            for len in 0..9 {
                let mut d = vec![0xAAu8; len];
                s.pio_read(BASE, off, &mut d);
                s.pio_write(BASE, off, &d);
            }
        }
        s.pio_write(BASE, 0xffff, &[1, 2, 3, 4]);
    }

    #[test]
    fn restored_uart_keeps_its_registers_and_unread_input() {
        let irq = Arc::new(CountingInterrupt::default());
        let mut s = SerialDevice::new(irq.clone(), Box::new(io::sink()));
        s.pio_write(BASE, 3, &[0x03]); // 8N1
        s.pio_write(BASE, 7, &[0x5a]); // scratch
        s.pio_write(BASE, 1, &[0x01]);
        s.enqueue_input(b"xyz").unwrap();
        let state = s.state();
        assert_eq!(state.input, b"xyz");

        let irq2 = Arc::new(CountingInterrupt::default());
        let mut r =
            SerialDevice::restored(irq2.clone(), Box::new(io::sink()), None, &state).unwrap();
        assert_eq!(r.state(), state);
        let mut b = [0u8; 1];
        for (offset, want) in [(3u16, 0x03u8), (7, 0x5a), (1, 0x01)] {
            r.pio_read(BASE, offset, &mut b);
            assert_eq!(b[0], want, "register {offset}");
        }
        for want in b"xyz" {
            r.pio_read(BASE, 0, &mut b);
            assert_eq!(b[0], *want);
        }
    }
}
