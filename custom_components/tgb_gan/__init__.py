"""The tgb_gan_augment bundle's own components: its networks, task-guided loss and trainer, synthesis,
age-region maps, training figures and the augmentation study."""
