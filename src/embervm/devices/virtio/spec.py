"""Constants from the virtio specification, with the spec's names.

Section numbers refer to virtio 1.2 (``oasis-tcs/virtio-spec``); Linux's uapi headers use the
same names.  Nothing but constants and tiny pure helpers lives here.
"""

# -- §4.2.2 MMIO device register layout (offsets from the device's base) ---------------------
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
GUEST_PAGE_SIZE = 0x028  # legacy (version 1) only, §4.2.4
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_ALIGN = 0x03C  # legacy only
QUEUE_PFN = 0x040  # legacy only
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MMIO_MAGIC = 0x74726976  # "virt"
MMIO_VERSION_LEGACY = 1
MMIO_VERSION_MODERN = 2
MMIO_SIZE = 0x1000  # one 4 KiB window per device
VENDOR_ID_EMBERVM = 0x45564D00  # "\0MVE": any value is fine, Linux only uses it for modalias

# -- §4.2.2 InterruptStatus bits ---------------------------------------------------------------
VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1

# -- §2.1 Device status field --------------------------------------------------------------------
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_SUSPEND = 16
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# -- §6 Reserved feature bits (bit numbers) ------------------------------------------------------
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_INDIRECT_DESC = 28  # VIRTIO_RING_F_INDIRECT_DESC
VIRTIO_F_EVENT_IDX = 29  # VIRTIO_RING_F_EVENT_IDX
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41


def bit(n: int) -> int:
    """The feature mask of feature bit number ``n``."""
    return 1 << n


# -- §5 Device IDs -------------------------------------------------------------------------------
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19

# -- §2.7.5 Split virtqueue descriptor flags -----------------------------------------------------
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_DESC_SIZE = 16

# §2.7.6 / §2.7.8 ring flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# -- §2.8 Packed virtqueue -------------------------------------------------------------------------
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

# §2.7 / §2.8 queue size limit
VIRTQ_MAX_SIZE = 32768


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.7.2 / Linux ``vring_need_event``: has ``event_idx`` been crossed by old→new?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
