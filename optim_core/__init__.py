"""paramserve.optim_core: the Keras 3 optimizer set on NumPy (default) or CuPy arrays.

>>> from paramserve.optim_core import get
>>> opt = get("adam")
>>> opt.apply(grads, variables)   # updates the arrays in place
"""

from . import schedules
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam
from .adamax import Adamax
from .adamw import AdamW
from .backend import DEVICES, array_module, gpu_available, resolve_device, to_device, to_numpy
from .base import Optimizer
from .ftrl import Ftrl
from .fused import prepare as prepare_kernels
from .fused import prepared as kernels_prepared
from .fused import set_threads as set_kernel_threads
from .fused import threads as kernel_threads
from .fused_gpu import prepare as prepare_gpu_kernels
from .fused_gpu import prepared as gpu_kernels_prepared
from .lamb import Lamb
from .lion import Lion
from .loss_scale_optimizer import LossScaleOptimizer
from .muon import Muon
from .nadam import Nadam
from .registry import deserialize, get, register_optimizer, registered_optimizers, serialize
from .rmsprop import RMSprop
from .schedule_free_adamw import ScheduleFreeAdamW
from .sgd import SGD
from .slabs import Slab, pack
from .variables import FLOAT_DTYPES, IndexedSlices, Variable

BUILTIN_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    SGD,
    RMSprop,
    Adam,
    AdamW,
    Adadelta,
    Adagrad,
    Adamax,
    Nadam,
    Ftrl,
    Lion,
    Lamb,
    Adafactor,
    Muon,
    ScheduleFreeAdamW,
    LossScaleOptimizer,
)
for _cls in BUILTIN_OPTIMIZERS:
    register_optimizer(_cls)
del _cls

__all__ = [
    "BUILTIN_OPTIMIZERS",
    "DEVICES",
    "FLOAT_DTYPES",
    "SGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Ftrl",
    "IndexedSlices",
    "Lamb",
    "Lion",
    "LossScaleOptimizer",
    "Muon",
    "Nadam",
    "Optimizer",
    "RMSprop",
    "ScheduleFreeAdamW",
    "Slab",
    "Variable",
    "array_module",
    "deserialize",
    "get",
    "gpu_available",
    "gpu_kernels_prepared",
    "kernel_threads",
    "kernels_prepared",
    "pack",
    "prepare_gpu_kernels",
    "prepare_kernels",
    "register_optimizer",
    "registered_optimizers",
    "resolve_device",
    "schedules",
    "serialize",
    "set_kernel_threads",
    "to_device",
    "to_numpy",
]
