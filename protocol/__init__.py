"""vmcast's wire format and reassembly state machine, with no I/O at all (docs/PROTOCOL.md).

The codec (`frames`) turns bytes into frames and back; `metadata` parses and builds what a stream announces
about its image; `assembly` is the receiver's state machine; `carousel` is the sender's schedule; `repair`
turns losses into requests and requests into a work list; `fec` makes and decodes per-block RaptorQ parity.
"""

from .assembly import (
    Assembly,
    AssemblyState,
    BlockCorrupt,
    BlockRecovered,
    BlockVerified,
    Checkpoint,
    DataReceived,
    Duplicate,
    ImageCorrupt,
    ImageVerified,
    MetadataReceived,
    PARITY_MEMORY_LIMIT,
    PARITY_SPARE,
    ParityReceived,
    ParityUnused,
    RecoveryFailed,
    RunReceived,
    StreamFailed,
)
from .carousel import METADATA_INTERVAL, Carousel, Idle, SendData, SendMetadata, SendParity
from .fec import FEC_SCHEME, ParityEncoder, decode_block, fec_possible, stream_fec_possible
from .repair import (
    REPAIR_REQUEST_OFFSET,
    RepairPlanner,
    RepairQueue,
    RepairRequest,
    decode_repair_request,
    encode_repair_request,
    encode_repair_requests,
)
from .errors import LocalProtocolError, MetadataConflict, ProtocolError, RemoteProtocolError
from .frames import (
    COOKIE_SIZE,
    HEADER,
    HEADER_SIZE,
    MAX_DATAGRAM,
    METADATA_OFFSET,
    PARITY_FLAG,
    DataFrame,
    Dropped,
    DropReason,
    MetadataFrame,
    ParityFrame,
    decode,
    encode_data,
    encode_header,
    encode_metadata,
    encode_parity_header,
    parity_fields,
)
from .metadata import (
    MAX_ZERO_FRAME_RUNS_PER_BLOCK,
    METADATA_PAYLOAD_LIMIT,
    PROTOCOL_VERSION,
    Layout,
    Manifest,
    ManifestBuilder,
    StreamMetadata,
    default_block_size,
    manifest_of,
    parse_metadata,
)

__all__ = [name for name in dir() if not name.startswith("_")]
