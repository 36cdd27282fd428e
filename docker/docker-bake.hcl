# docker buildx bake -f docker/docker-bake.hcl       (cpu, cuda and triton images)
group "default" { targets = ["cpu", "cuda", "triton"] }

target "cpu" {
  context    = "."
  dockerfile = "docker/Dockerfile"
  tags       = ["atoken-serve:cpu"]
}

target "cuda" {
  inherits = ["cpu"]
  args = {
    TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
    TORCH_SPEC  = "torch>=2.7,<3"
    EXTRAS      = "ray"
  }
  tags = ["atoken-serve:cuda"]
}

target "triton" {
  context    = "."
  dockerfile = "docker/Dockerfile.triton"
  tags       = ["atoken-serve:triton"]
}
