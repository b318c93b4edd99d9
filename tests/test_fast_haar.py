"""The fused Triton Haar kernels: equal to the PyTorch path, exact backward, torch.compile, dispatch, errors.

With no GPU, the tests re-run this file in a fresh process under Triton's CPU interpreter (TRITON_INTERPRET=1
must be set before Triton is imported), so CI runs the real kernel code."""
import os, subprocess, sys
import pytest, torch

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'

if not ON_GPU and not INTERPRETED:
    def test_kernels_under_triton_interpreter():
        r = subprocess.run([sys.executable, '-m', 'pytest', __file__, '-q', '-p', 'no:cacheprovider'], capture_output=True,
                           text=True, timeout=1200, env=dict(os.environ, TRITON_INTERPRET='1', WAVENB_HAAR_BACKEND='triton'))
        print(r.stdout[-3000:])
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert ' passed' in r.stdout and ' failed' not in r.stdout
else:
    from wavenb.fast_haar import haar_fwd, haar_inv, use_fast_haar
    from wavenb.haar import _haar_fwd, _haar_inv, dwt2_stacked, idwt2_stacked, wavedec2, waverec2
    DEV = 'cuda' if ON_GPU else 'cpu'
    TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}

    @pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize('shape', [(2, 3, 32, 32), (1, 1, 2, 2), (3, 18, 150), (2, 2, 130, 16), (4, 2, 6, 258)])
    def test_kernel_equals_reference(dtype, shape):
        x = torch.randn(*shape, device=DEV).to(dtype)
        y = haar_fwd(x)
        ref = _haar_fwd(x.double())
        assert y.dtype == dtype and y.shape == ref.shape
        torch.testing.assert_close(y.double(), ref.to(dtype).double(), atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(haar_inv(y).double(), _haar_inv(y.double()).to(dtype).double(), atol=TOL[dtype], rtol=TOL[dtype])
        if dtype == torch.float32: assert (haar_inv(y) - x).abs().max() < 1e-5

    def test_backward_is_the_inverse_and_gradcheck():
        x = torch.randn(2, 3, 8, 12, device=DEV, requires_grad=True)
        g = torch.randn(2, 3, 4, 4, 6, device=DEV)
        (gx,) = torch.autograd.grad(haar_fwd(x), x, g)
        torch.testing.assert_close(gx, _haar_inv(g), atol=1e-6, rtol=1e-6)
        y = torch.randn(2, 3, 4, 4, 6, device=DEV, requires_grad=True)
        (gy,) = torch.autograd.grad(haar_inv(y), y, x.detach())
        torch.testing.assert_close(gy, _haar_fwd(x.detach()), atol=1e-6, rtol=1e-6)
        # finite differences in float32 (the kernel computes in float32; float64 takes the PyTorch path)
        t = torch.randn(1, 1, 4, 4, device=DEV, requires_grad=True)
        assert torch.autograd.gradcheck(haar_fwd, (t,), eps=1e-2, atol=1e-3, rtol=1e-3)
        s = torch.randn(1, 1, 4, 2, 2, device=DEV, requires_grad=True)
        assert torch.autograd.gradcheck(haar_inv, (s,), eps=1e-2, atol=1e-3, rtol=1e-3)

    def test_dispatch():
        x = torch.randn(2, 3, 16, 16, device=DEV)
        assert use_fast_haar(x) and not use_fast_haar(x.double())
        torch.testing.assert_close(dwt2_stacked(x), _haar_fwd(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(waverec2(wavedec2(x, 'haar', 3)), x, atol=1e-5, rtol=0)
        nc = torch.randn(2, 16, 16, 3, device=DEV).permute(0, 3, 1, 2)          # non-contiguous input
        torch.testing.assert_close(dwt2_stacked(nc), _haar_fwd(nc), atol=1e-6, rtol=0)
        os.environ['WAVENB_HAAR_BACKEND'] = 'torch'
        try: assert not use_fast_haar(x)
        finally: os.environ['WAVENB_HAAR_BACKEND'] = 'auto' if ON_GPU else 'triton'

    def test_odd_sizes_still_rejected_by_the_foundation_checks():
        with pytest.raises(ValueError, match=r'level 1 of 1.*\(2, 3, 9, 8\)'): dwt2_stacked(torch.zeros(2, 3, 9, 8, device=DEV))

    def test_torch_compile_traces_the_op():
        f = torch.compile(lambda x: idwt2_stacked(dwt2_stacked(x) * 2), fullgraph=True, backend='inductor' if ON_GPU else 'aot_eager')
        x = torch.randn(2, 3, 16, 16, device=DEV)
        torch.testing.assert_close(f(x), 2 * x, atol=1e-5, rtol=0)

    def test_bench_includes_the_kernel_and_checks_libraries():
        from wavenb.fast_haar import bench_haar
        rows = bench_haar(shapes=[(1, 2, 4, 8)], dtypes=['float32'], device=DEV, min_run_time=0.01)
        timed = {r['impl'] for r in rows if 'median_ms' in r}
        assert {'copy', 'wavenb kernel', 'wavenb torch'} <= timed
        assert all(r['x_copy_speed'] > 0 for r in rows if 'median_ms' in r)
