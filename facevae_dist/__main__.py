from facevae_dist.cli import run

run()
