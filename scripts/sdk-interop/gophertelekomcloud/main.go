// Points gophertelekomcloud (the SDK of the OTC Terraform provider) at the emulator.
package main

import (
	"fmt"
	"os"

	golangsdk "github.com/opentelekomcloud/gophertelekomcloud"
	"github.com/opentelekomcloud/gophertelekomcloud/openstack"
	"github.com/opentelekomcloud/gophertelekomcloud/openstack/kms/v1/grants"
	"github.com/opentelekomcloud/gophertelekomcloud/openstack/kms/v1/keys"
)

func check(err error, what string) {
	if err != nil {
		fmt.Printf("FAIL %s: %v\n", what, err)
		os.Exit(1)
	}
}

func run(name string, provider *golangsdk.ProviderClient) {
	client, err := openstack.NewKMSV1(provider, golangsdk.EndpointOpts{Region: "eu-de"})
	check(err, name+" kms client")
	fmt.Printf("%s: KMS endpoint from catalog %s\n", name, client.ResourceBaseURL())
	key, err := keys.Create(client, keys.CreateOpts{KeyAlias: "gosdk-" + name}).ExtractKeyInfo()
	check(err, name+" create-key")
	grant, err := grants.Create(client, grants.CreateOpts{KeyID: key.KeyID, GranteePrincipal: "abc123", Operations: []string{"describe-key", "create-datakey"}, Name: "g1", RetiringPrincipal: "abc123"}).Extract()
	check(err, name+" create-grant")
	list, err := grants.List(client, grants.ListOpts{KeyID: key.KeyID, Limit: "10"}).Extract()
	check(err, name+" list-grants")
	fmt.Printf("%s: key %s grant %s listed %d (truncated %q, next_marker %q, ops %v)\n", name, key.KeyID, grant.GrantID, len(list.Grants), list.Truncated, list.NextMarker, list.Grants[0].Operations)
	err = grants.Delete(client, grants.DeleteOpts{KeyID: key.KeyID, GrantID: grant.GrantID}).ExtractErr()
	check(err, name+" revoke-grant")
	fmt.Printf("%s: revoked\n", name)
}

func main() {
	base := os.Args[1]
	aksk, err := openstack.AuthenticatedClient(golangsdk.AKSKAuthOptions{
		IdentityEndpoint: base + "/v3", AccessKey: "EMULATORACCESSKEY000", SecretKey: "emulator-secret-key-0000000000000000000",
		Region: "eu-de", ProjectName: "eu-de", Domain: "emulator-domain",
	})
	check(err, "aksk auth")
	run("aksk", aksk)
	password, err := openstack.AuthenticatedClient(golangsdk.AuthOptions{
		IdentityEndpoint: base + "/v3", Username: "emulator-user", Password: "emulator-password",
		DomainName: "emulator-domain", TenantName: "eu-de",
	})
	check(err, "password auth")
	run("password", password)
	fmt.Println("OK")
}
