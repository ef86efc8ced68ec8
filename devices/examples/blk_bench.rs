//! The virtio-blk data path with no guest: host threads play the driver.
//!
//! A [`Block`] device is activated through the crate's public API exactly as a transport does
//! it — guest memory, one split virtqueue per driver thread, an eventfd per queue for the
//! driver's notifications (the ioeventfd of a VMM) and one per queue for the device's
//! interrupts (the irqfd). Each driver thread lays out its requests (header, data buffer,
//! status byte: three descriptors) once, keeps `--qd` of them available, kicks the queue when
//! the device asks for it (VIRTIO_RING_F_EVENT_IDX, §2.7.10), sleeps on the interrupt eventfd,
//! and reaps completions from the used ring, resubmitting each at once. What it measures is
//! what the VMM owns of a request — notification, parsing, host I/O, used ring, interrupt —
//! without a guest kernel's block layer on top.
//!
//! ```text
//! cargo run --release -p hotplug-vmm-devices --example blk_bench -- \
//!     --file IMAGE --rw randread|randwrite|read|write --bs 4096 --qd 32 \
//!     [--queues 1] [--direct] [--aio auto|io_uring|threads] [--driver-poll] [--runtime 5]
//! cargo run --release -p hotplug-vmm-devices --example blk_bench -- --floor
//! ```
//!
//! Prints one JSON line: requests per second, MiB/s, p50/p99 latency in microseconds (from the
//! request made available to its completion read from the used ring). `--floor` measures the
//! notification round trip alone instead: an eventfd ping-pong between two threads, the least a
//! request at depth 1 can cost when the device and the driver are different threads.
//! `resources/bench-datapath.py` runs the matrix beside fio and `qemu-img bench`.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hotplug_vmm_devices::virtio::block::{AioBackend, Block, BlockConfig};
use hotplug_vmm_devices::virtio::{
    ActiveQueue, GuestMemory, GuestRam, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

/// Entries of each queue: room for 85 requests of three descriptors.
const QUEUE_SIZE: u16 = 256;
/// Guest memory each queue's rings, headers and status bytes take, before its data buffers.
const RING_AREA: u64 = 1 << 20;

/// What to run, from the command line.
#[derive(Clone, Debug)]
struct Params {
    file: String,
    write: bool,
    random: bool,
    bs: u64,
    qd: u16,
    queues: u16,
    direct: bool,
    runtime: Duration,
    aio: AioBackend,
    /// The driver polls the used ring instead of sleeping until the interrupt.
    driver_poll: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: blk_bench --file IMAGE --rw randread|randwrite|read|write --bs BYTES --qd N \
         [--queues N] [--direct] [--aio auto|io_uring|threads] [--driver-poll] [--runtime SECS] | --floor"
    );
    std::process::exit(2)
}

fn parse_args() -> Option<Params> {
    let mut p = Params {
        file: String::new(),
        write: false,
        random: true,
        bs: 4096,
        qd: 1,
        queues: 1,
        direct: false,
        runtime: Duration::from_secs(5),
        aio: AioBackend::Auto,
        driver_poll: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--floor" => return None,
            "--file" => p.file = value(),
            "--rw" => {
                (p.random, p.write) = match value().as_str() {
                    "randread" => (true, false),
                    "randwrite" => (true, true),
                    "read" => (false, false),
                    "write" => (false, true),
                    _ => usage(),
                }
            }
            "--bs" => p.bs = value().parse().unwrap_or_else(|_| usage()),
            "--qd" => p.qd = value().parse().unwrap_or_else(|_| usage()),
            "--queues" => p.queues = value().parse().unwrap_or_else(|_| usage()),
            "--direct" => p.direct = true,
            "--driver-poll" => p.driver_poll = true,
            "--aio" => p.aio = AioBackend::from_name(&value()).unwrap_or_else(|| usage()),
            "--runtime" => {
                p.runtime = Duration::from_secs_f64(value().parse().unwrap_or_else(|_| usage()))
            }
            _ => usage(),
        }
    }
    let fits = 3 * u32::from(p.qd) <= u32::from(QUEUE_SIZE);
    if p.file.is_empty() || p.qd == 0 || !fits || p.queues == 0 || !p.bs.is_multiple_of(512) {
        usage();
    }
    Some(p)
}

/// The device's interrupts: an eventfd per queue, as an irqfd would be.
struct Irqfds(Vec<EventFd>);

impl VirtioInterrupt for Irqfds {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        match kind {
            VirtioInterruptType::Queue(n) => self.0[usize::from(n)].write(1),
            VirtioInterruptType::Config => Ok(()),
        }
    }
}

/// Where one queue's split ring and requests sit in guest memory (Virtio 1.2 §2.7).
#[derive(Clone, Copy)]
struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
    headers: u64,
    status: u64,
    data: u64,
}

impl Layout {
    fn new(base: u64, data: u64) -> Layout {
        let size = u64::from(QUEUE_SIZE);
        let desc = base;
        let avail = desc + 16 * size;
        // flags, idx, ring[size], used_event; the used ring 4-byte aligned.
        let used = (avail + 4 + 2 * size + 2 + 3) & !3;
        let headers = (used + 4 + 8 * size + 2 + 15) & !15;
        let status = headers + 16 * size;
        assert!(status + size <= data && data - base >= RING_AREA);
        Layout {
            desc,
            avail,
            used,
            headers,
            status,
            data,
        }
    }

    fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(QUEUE_SIZE)
    }

    fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * u64::from(QUEUE_SIZE)
    }
}

/// Writes descriptor `i` of a table at `table`.
fn put_desc(mem: &GuestRam, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(table + 16 * u64::from(i)))
        .unwrap();
}

/// `vring_need_event` (§2.7.10): whether moving an index from `old` to `new` passed `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A small, fast generator of offsets (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What one driver thread saw.
struct DriverResult {
    done: u64,
    errors: u64,
    latencies_ns: Vec<u64>,
}

/// One driver thread on queue `q`: keeps `p.qd` requests available until `stop`, then drains.
#[allow(clippy::too_many_arguments)]
fn drive(
    mem: &GuestRam,
    l: Layout,
    q: u16,
    p: &Params,
    sectors: u64,
    kick: &EventFd,
    irq: &EventFd,
    start: &Barrier,
    stop: &AtomicBool,
) -> DriverResult {
    let blocks = (sectors * 512 / p.bs).max(1);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(q + 1));
    let mut next_block = u64::from(q) * blocks / u64::from(p.queues);
    let mut submitted_at = vec![Instant::now(); usize::from(p.qd)];
    let mut latencies_ns = Vec::with_capacity(1 << 20);
    let (mut avail_idx, mut last_used, mut in_flight) = (0u16, 0u16, 0u16);
    let (mut done, mut errors) = (0u64, 0u64);
    let kind = if p.write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    // Each request keeps its three descriptors: 3i header, 3i+1 data, 3i+2 status.
    for i in 0..p.qd {
        let data_flags = if p.write {
            0
        } else {
            VRING_DESC_F_WRITE as u16
        };
        let next = VRING_DESC_F_NEXT as u16;
        let h = 3 * i;
        put_desc(
            mem,
            l.desc,
            h,
            l.headers + 16 * u64::from(i),
            16,
            next,
            h + 1,
        );
        let buf = l.data + u64::from(i) * p.bs;
        put_desc(
            mem,
            l.desc,
            h + 1,
            buf,
            p.bs as u32,
            data_flags | next,
            h + 2,
        );
        let st = l.status + u64::from(i);
        put_desc(mem, l.desc, h + 2, st, 1, VRING_DESC_F_WRITE as u16, 0);
    }
    let mut submit = |i: u16, avail_idx: &mut u16, rng: &mut Rng, at: &mut [Instant]| {
        let block = if p.random {
            rng.next() % blocks
        } else {
            let b = next_block;
            next_block = (next_block + 1) % blocks;
            b
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&(block * p.bs / 512).to_le_bytes());
        let hdr = GuestAddress(l.headers + 16 * u64::from(i));
        mem.write_slice(&h, hdr).unwrap();
        mem.write_obj(0xffu8, GuestAddress(l.status + u64::from(i)))
            .unwrap();
        let slot = l.avail + 4 + 2 * u64::from(*avail_idx % QUEUE_SIZE);
        mem.write_obj(3 * i, GuestAddress(slot)).unwrap();
        at[usize::from(i)] = Instant::now();
        *avail_idx = avail_idx.wrapping_add(1);
    };
    let publish = |old: u16, new: u16| {
        // The ring entries before the index (release), the index before the event (full fence:
        // the device reads avail_event after publishing its own index, §2.7.10).
        mem.store(new, GuestAddress(l.avail + 2), Ordering::Release)
            .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        let event: u16 = mem
            .load(GuestAddress(l.avail_event()), Ordering::Acquire)
            .unwrap();
        if need_event(event, new, old) {
            kick.write(1).unwrap();
        }
    };
    start.wait();
    let old = avail_idx;
    for i in 0..p.qd {
        submit(i, &mut avail_idx, &mut rng, &mut submitted_at);
        in_flight += 1;
    }
    publish(old, avail_idx);
    while in_flight > 0 {
        // Ask for an interrupt at the next completion, then look before sleeping.
        mem.store(last_used, GuestAddress(l.used_event()), Ordering::Release)
            .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut used_idx: u16 = mem
            .load(GuestAddress(l.used + 2), Ordering::Acquire)
            .unwrap();
        if used_idx == last_used && !p.driver_poll {
            irq.read().unwrap();
            used_idx = mem
                .load(GuestAddress(l.used + 2), Ordering::Acquire)
                .unwrap();
        }
        let old = avail_idx;
        let stopping = stop.load(Ordering::Relaxed);
        while last_used != used_idx {
            let elem = l.used + 4 + 8 * u64::from(last_used % QUEUE_SIZE);
            let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
            last_used = last_used.wrapping_add(1);
            let i = (id / 3) as u16;
            let status: u8 = mem.read_obj(GuestAddress(l.status + u64::from(i))).unwrap();
            if status != 0 {
                errors += 1;
            }
            done += 1;
            latencies_ns.push(submitted_at[usize::from(i)].elapsed().as_nanos() as u64);
            if stopping {
                in_flight -= 1;
            } else {
                submit(i, &mut avail_idx, &mut rng, &mut submitted_at);
            }
        }
        if avail_idx != old {
            publish(old, avail_idx);
        }
    }
    DriverResult {
        done,
        errors,
        latencies_ns,
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn run(p: &Params) {
    let mut open = OpenOptions::new();
    open.read(true).write(p.write);
    if p.direct {
        open.custom_flags(libc::O_DIRECT);
    }
    let file = open
        .open(&p.file)
        .unwrap_or_else(|e| panic!("{}: {e}", p.file));
    let mut config = BlockConfig::new(&p.file, "bench");
    config.num_queues = p.queues;
    config.queue_size = QUEUE_SIZE;
    config.readonly = !p.write;
    config.aio = p.aio;
    let mut block = Block::with_file(config, file).expect("the device");
    let sectors = block.capacity();

    let per_queue_data = u64::from(p.qd) * p.bs;
    let per_queue = RING_AREA + ((per_queue_data + 4095) & !4095);
    let ram_size = u64::from(p.queues) * per_queue;
    let ram = GuestRam::from_ranges(&[(GuestAddress(0), ram_size as usize)]).unwrap();
    // A running guest's memory is populated: so is this (an untouched page is no page yet,
    // and the host's O_DIRECT path cannot pin it without blocking: io_uring would hand every
    // such write to a kernel worker).
    for page in (0..ram_size).step_by(4096) {
        ram.write_obj(0x5au8, GuestAddress(page)).unwrap();
    }
    let layouts: Vec<Layout> = (0..u64::from(p.queues))
        .map(|q| Layout::new(q * per_queue, q * per_queue + RING_AREA))
        .collect();
    let kicks: Vec<Arc<EventFd>> = (0..p.queues)
        .map(|_| Arc::new(EventFd::new(0).unwrap()))
        .collect();
    let irqs = Arc::new(Irqfds(
        (0..p.queues).map(|_| EventFd::new(0).unwrap()).collect(),
    ));
    let queues = layouts
        .iter()
        .zip(&kicks)
        .enumerate()
        .map(|(n, (l, kick))| {
            let mut queue = Queue::new(QUEUE_SIZE).unwrap();
            queue.try_set_size(QUEUE_SIZE).unwrap();
            queue
                .try_set_desc_table_address(GuestAddress(l.desc))
                .unwrap();
            queue
                .try_set_avail_ring_address(GuestAddress(l.avail))
                .unwrap();
            queue
                .try_set_used_ring_address(GuestAddress(l.used))
                .unwrap();
            queue.set_ready(true);
            ActiveQueue {
                index: n as u16,
                queue,
                notify: kick.clone(),
            }
        })
        .collect();
    let features = block.features();
    let memory: GuestMemory = GuestMemoryAtomic::new(ram.clone());
    block
        .activate(memory, irqs.clone(), features, queues)
        .expect("activate");

    let start = Barrier::new(usize::from(p.queues) + 1);
    let stop = AtomicBool::new(false);
    let (began, results): (Instant, Vec<DriverResult>) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..p.queues)
            .map(|q| {
                let (ram, l) = (&ram, layouts[usize::from(q)]);
                let (kick, irq) = (&*kicks[usize::from(q)], &irqs.0[usize::from(q)]);
                let (start, stop) = (&start, &stop);
                s.spawn(move || drive(ram, l, q, p, sectors, kick, irq, start, stop))
            })
            .collect();
        start.wait();
        let began = Instant::now();
        std::thread::sleep(p.runtime);
        stop.store(true, Ordering::Relaxed);
        (
            began,
            handles.into_iter().map(|h| h.join().unwrap()).collect(),
        )
    });
    let elapsed = began.elapsed().as_secs_f64();
    block.reset();

    let done: u64 = results.iter().map(|r| r.done).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let mut lat: Vec<u64> = results.into_iter().flat_map(|r| r.latencies_ns).collect();
    lat.sort_unstable();
    let iops = done as f64 / elapsed;
    println!(
        "{{\"engine\":\"hotplug-vmm\",\"aio\":\"{}\",\"rw\":\"{}{}\",\"bs\":{},\"qd\":{},\"queues\":{},\"direct\":{},\
         \"iops\":{:.0},\"mib_s\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"errors\":{}}}",
        p.aio.name(),
        if p.random { "rand" } else { "" },
        if p.write { "write" } else { "read" },
        p.bs,
        p.qd,
        p.queues,
        p.direct,
        iops,
        iops * p.bs as f64 / f64::from(1 << 20),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        errors
    );
}

/// The notification round trip alone: two threads, two eventfds, one token passed back and
/// forth, as a driver's kick and a device's interrupt are.
fn floor() {
    let ping = EventFd::new(0).unwrap();
    let pong = EventFd::new(0).unwrap();
    let rounds = 200_000u32;
    let mut lat = Vec::with_capacity(rounds as usize);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..rounds {
                ping.read().unwrap();
                pong.write(1).unwrap();
            }
        });
        for _ in 0..rounds {
            let t = Instant::now();
            ping.write(1).unwrap();
            pong.read().unwrap();
            lat.push(t.elapsed().as_nanos() as u64);
        }
    });
    lat.sort_unstable();
    println!(
        "{{\"engine\":\"eventfd-ping-pong\",\"rounds\":{rounds},\"p50_us\":{:.2},\"p99_us\":{:.2}}}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
}

fn main() {
    match parse_args() {
        Some(p) => run(&p),
        None => floor(),
    }
}
