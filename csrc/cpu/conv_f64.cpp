// The double-precision half of the CPU convolution: conv.cpp compiled again with ConvAcc = double (see the note
// after its includes), so that its two halves build in parallel.
#define MLTK_CONV_F64
#include "conv.cpp"
