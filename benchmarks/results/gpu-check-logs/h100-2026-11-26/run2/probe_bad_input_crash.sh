#!/usr/bin/env bash
# One-off probe of the segfault seen when a CUDA raw entry point rejects an input with a shape in its message.
cd "$(dirname "$0")/.."
PY=.venv/bin/python
try() {  # try NAME CODE: run CODE in a fresh process, report how it ended
  timeout 60 $PY -X faulthandler -c "import torch, mltoolkit._C as C
$2" >/tmp/probe-$1.log 2>&1
  echo "$1: rc=$? $(grep -E 'Error|error' /tmp/probe-$1.log | tail -1 | cut -c1-150)"
}
try cuda_dtype "x=torch.randn(4,8,device='cuda'); C.norm_forward_cuda(x.int(), None, None, None, 1e-5, False)"
try cuda_shape "x=torch.randn(4,8,device='cuda'); C.norm_forward_cuda(x.view(2,2,8), None, None, None, 1e-5, False)"
try cpu_shape "x=torch.randn(4,8); C.norm_forward_cpu(x.view(2,2,8), None, None, None, 1e-5, False)"
try cpu_shape_after_cuda "torch.zeros(1,device='cuda'); x=torch.randn(4,8); C.norm_forward_cpu(x.view(2,2,8), None, None, None, 1e-5, False)"
try op_shape "import mltoolkit; from mltoolkit import ops; x=torch.randn(2,3,8,device='cuda'); ops.layer_norm(x, (4,))"
try torch_int_msg "x=torch.randn(4,8,device='cuda'); torch.ops.aten.view(x,(3,5))"
try check_int "torch._C._set_print_stack_traces_on_fatal_signal(True) if hasattr(torch._C,'_set_print_stack_traces_on_fatal_signal') else None; x=torch.randn(4,8,device='cuda'); C.norm_forward_cuda(x.view(2,2,8), None, None, None, 1e-5, False)"
grep -E "stdc|libc10|_C\." /proc/self/maps >/dev/null
$PY -c "import torch, mltoolkit._C; print(open('/proc/self/maps').read())" | grep -oE "/[^ ]*(stdc\+\+|libgcc_s|libgomp)[^ ]*" | sort -u
ldd mltoolkit/_C*.so | grep -E "stdc|gomp|gcc_s|c10"
echo "--- cuda-gdb backtrace"
timeout 90 cuda-gdb -q -batch -ex "set pagination off" -ex "set auto-solib-add off" -ex run \
  -ex "sharedlibrary _C" -ex "sharedlibrary libstdc" -ex "sharedlibrary libc10.so" -ex "bt 25" \
  --args $PY -c "import torch, mltoolkit._C as C; x=torch.randn(4,8,device='cuda'); C.norm_forward_cuda(x.view(2,2,8), None, None, None, 1e-5, False)" 2>&1 \
  | grep -vE "^\[New Thread|^\[Thread|warning: .*debug" | tail -40
