"""Drop-in modules: torch's class names, constructors and state_dict keys, mltoolkit kernels inside."""
from mltoolkit.nn.attention import MultiheadAttention
from mltoolkit.nn.conv import Conv1d, Conv2d, Conv2dBNAct
from mltoolkit.nn.norm import LayerNorm, RMSNorm
from mltoolkit.nn.rnn import GRU, LSTM
from mltoolkit.nn.squeeze_excitation import SqueezeExcitation

__all__ = ["LayerNorm", "RMSNorm", "MultiheadAttention", "Conv1d", "Conv2d", "Conv2dBNAct", "LSTM", "GRU",
           "SqueezeExcitation"]
