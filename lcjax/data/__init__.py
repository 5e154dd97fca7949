"""lcjax.data: document sources, tokenizers, packing and the grain pipeline."""

# --- sources and tokenizers (lcjax/data/sources.py, stdlib_corpus.py, tokenizers.py) ---
# Re-exported with `X as X` so this block needs no shared __all__.
from lcjax.data.sources import SOURCE_KINDS as SOURCE_KINDS
from lcjax.data.sources import SOURCE_OPTIONS as SOURCE_OPTIONS
from lcjax.data.sources import DataPathNotFoundError as DataPathNotFoundError
from lcjax.data.sources import DocumentSource as DocumentSource
from lcjax.data.sources import EmptyCorpusError as EmptyCorpusError
from lcjax.data.sources import MissingDependencyError as MissingDependencyError
from lcjax.data.sources import RecordError as RecordError
from lcjax.data.sources import build_source as build_source
from lcjax.data.sources import check_source_options as check_source_options
from lcjax.data.sources import describe_document as describe_document
from lcjax.data.stdlib_corpus import corpus_stats as corpus_stats
from lcjax.data.tokenizers import TOKENIZER_KINDS as TOKENIZER_KINDS
from lcjax.data.tokenizers import TOKENIZER_OPTIONS as TOKENIZER_OPTIONS
from lcjax.data.tokenizers import ByteTokenizer as ByteTokenizer
from lcjax.data.tokenizers import HFTokenizer as HFTokenizer
from lcjax.data.tokenizers import Tokenizer as Tokenizer
from lcjax.data.tokenizers import UndecodableDocument as UndecodableDocument
from lcjax.data.tokenizers import build_tokenizer as build_tokenizer
from lcjax.data.tokenizers import check_tokenizer_options as check_tokenizer_options

# --- end sources and tokenizers ---

# --- config, packing, mixtures, dataset decomposition, pipeline, synthetic rows (config.py,
# packing.py, mixture.py, decomposition.py, pipeline.py, synthetic.py) ---
# isort: split
from lcjax.data.config import DECOMPOSITION_DEFAULTS as DECOMPOSITION_DEFAULTS
from lcjax.data.config import default_data_config as default_data_config
from lcjax.data.config import validate_data_config as validate_data_config
from lcjax.data.decomposition import DecomposedBatcher as DecomposedBatcher
from lcjax.data.decomposition import binary_decomposition as binary_decomposition
from lcjax.data.decomposition import curriculum_probabilities as curriculum_probabilities
from lcjax.data.mixture import MixedStream as MixedStream
from lcjax.data.mixture import MixtureSampler as MixtureSampler
from lcjax.data.packing import ROW_KEYS as ROW_KEYS
from lcjax.data.packing import DocumentPacker as DocumentPacker
from lcjax.data.packing import make_positions_np as make_positions_np
from lcjax.data.packing import row_loss_weights as row_loss_weights
from lcjax.data.pipeline import TrainIterator as TrainIterator
from lcjax.data.pipeline import make_eval_documents as make_eval_documents
from lcjax.data.pipeline import make_train_iterator as make_train_iterator
from lcjax.data.synthetic import SYNTHETIC_OPTIONS as SYNTHETIC_OPTIONS
from lcjax.data.synthetic import SYNTHETIC_TASKS as SYNTHETIC_TASKS
from lcjax.data.synthetic import SyntheticRows as SyntheticRows

# --- end config, packing, mixtures, dataset decomposition, pipeline, synthetic rows ---
